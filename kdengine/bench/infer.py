"""Inference-runtime benchmark: batch-1 CPU latency (p50, p99) of a binary network run by
:mod:`kdengine.infer` against the same network in fp32, torch eager, measured side by side.

Networks (weights random but identical where the two networks share a layer; latency does not
depend on the values):

* ``mlp-bin3``:
  784-4096-4096-4096-10 (quick: hidden 2048), all three hidden layers binary.
  float: ``Flatten, BN(784), Linear(784,H), BN, Hardtanh, [Linear(H,H), BN, Hardtanh] x 2,
  Linear(H,10)``. binary: the same with the three hidden ``Linear`` layers as
  :class:`~kdengine.nn.BinaryLinear` ``mode="both"`` (binary weights *and* activations: the sign of
  each one's BN-normalised input is the nonlinearity, so no Hardtanh; for the first, that is a
  learned per-pixel threshold, i.e. binarized MNIST), only the 4096->10 classifier fp32. The
  binary layers hold 99.9 % of the float network's weights;
  ``pack_model`` -> ``save_packed`` -> :func:`kdengine.infer.load`.
* ``mlp-fp1``: the same widths with the first layer (784->H) fp32 and two binary hidden layers,
  as in BinaryNet / XNOR-Net, informational: there the fp32 first layer (12.8 MB at H = 4096,
  read once per batch-1 call) is 3/4 of the binary network's bytes and sets its latency floor.
* ``vgg``: a VGG-ish conv net on 1x28x28, informational:
  ``conv(1->64) pool BN | bconv(64->128) pool BN | bconv(128->256) pool BN | flatten
  bfc(2304->1024) BN | fc(1024->10)`` (3x3, padding 1, binary layers ``mode="both"``; the float
  network has Conv2d/Linear there and a Hardtanh after each of those BNs).

Every network runs at 1 thread and at torch's current thread count (2 on the project machine);
the 1-thread rows are the robust ones on a shared machine: with 2 threads, a parallel region waits
for whichever thread the OS has descheduled, which shows up in p99 (for both implementations).

Each network is timed three ways, in steady state (a few untimed calls before each block of timed
calls), alternating blocks in rounds so that the drifting load of a shared machine hits all of
them alike (:func:`interleaved_times`): ``torch eager fp32`` (the float network called under ``inference_mode``),
``packed nn.Module eager`` (the loaded packed model called as a module: the public ops, with their
per-call checks and conv weight repacking) and ``kdengine.infer`` (:meth:`InferenceModel.predict`).
Every call is timed alone (``perf_counter``); p50/p99 are nearest-rank percentiles.
``kdengine_speedup`` = this row's p50 / kdengine.infer's p50 (as in the other suites: how many
times slower this implementation is).
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import torch
from torch import nn

from kdengine.bench.timing import progress
from kdengine.infer.runtime import InferenceModel, latency_stats, load

__all__ = ["run_infer_bench", "notes", "mlp_pair", "vgg_pair", "interleaved_times"]



def _bn_stats_(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _pack_and_load(binary: nn.Module, tmpdir: str, name: str) -> InferenceModel:
    from kdengine.nn import pack_model
    from kdengine.serialize import save_packed

    path = os.path.join(tmpdir, f"{name}.safetensors")
    save_packed(pack_model(binary.eval()), path)
    return load(path)


def mlp_pair(hidden: int = 4096, seed: int = 0, binary_input: bool = True) -> tuple[nn.Module, nn.Module]:
    """(float network, training-time binary network) of the ``mlp`` cases (module docstring):
    ``binary_input=True`` is ``mlp-bin3`` (all three hidden layers binary, the input binarized by
    BN + sign), False is ``mlp-fp1`` (first layer fp32, two binary hidden layers)."""
    import copy

    from kdengine.nn import BinaryLinear

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    l1, l2, l3, l4 = nn.Linear(784, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)
    bn = [nn.BatchNorm1d(hidden) for _ in range(3)]
    bn_in = [nn.BatchNorm1d(784)] if binary_input else []
    fnet = nn.Sequential(nn.Flatten(), *bn_in, l1, bn[0], nn.Hardtanh(), l2, bn[1], nn.Hardtanh(), l3,
                         bn[2], nn.Hardtanh(), l4)
    _bn_stats_(fnet, g)
    d = copy.deepcopy
    first = BinaryLinear.from_linear(l1, mode="both") if binary_input else d(l1)
    bnet = nn.Sequential(nn.Flatten(), *[d(b) for b in bn_in], first, d(bn[0]),
                         BinaryLinear.from_linear(l2, mode="both"), d(bn[1]),
                         BinaryLinear.from_linear(l3, mode="both"), d(bn[2]), d(l4))
    return fnet.eval(), bnet.eval()


def vgg_pair(width: int = 64, hidden: int = 1024, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(float network, training-time binary network) of the ``vgg`` case (module docstring)."""
    import copy

    from kdengine.nn import BinaryConv2d, BinaryLinear

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    c1, c2, c3 = width, 2 * width, 4 * width
    conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
    conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
    conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
    fc1, fc2 = nn.Linear(c3 * 9, hidden, bias=False), nn.Linear(hidden, 10)
    bns = [nn.BatchNorm2d(c1), nn.BatchNorm2d(c2), nn.BatchNorm2d(c3), nn.BatchNorm1d(hidden)]
    fnet = nn.Sequential(
        conv1, nn.MaxPool2d(2), bns[0], nn.Hardtanh(),
        conv2, nn.MaxPool2d(2), bns[1], nn.Hardtanh(),
        conv3, nn.MaxPool2d(2), bns[2], nn.Hardtanh(), nn.Flatten(),
        fc1, bns[3], nn.Hardtanh(), fc2,
    )
    _bn_stats_(fnet, g)
    d = copy.deepcopy
    bnet = nn.Sequential(
        d(conv1), nn.MaxPool2d(2), d(bns[0]),
        BinaryConv2d.from_conv(conv2, mode="both"), nn.MaxPool2d(2), d(bns[1]),
        BinaryConv2d.from_conv(conv3, mode="both"), nn.MaxPool2d(2), d(bns[2]), nn.Flatten(),
        BinaryLinear.from_linear(fc1, mode="both"), d(bns[3]), d(fc2),
    )
    return fnet.eval(), bnet.eval()


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, per_round: int,
                      warmup: int = 3) -> dict[str, list[float]]:
    """Per-call wall times (s) of each function, in steady state: ``rounds`` rounds; in each,
    every function in turn gets ``warmup`` untimed calls (caches and allocator warm again after
    the other functions ran) and then ``per_round`` timed calls. Alternating the blocks spreads
    the drifting load of a shared machine over all functions alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            out = times[name]
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return times


def _case_rows(case: str, shape: str, fnet: nn.Module, model: InferenceModel, x: torch.Tensor,
               rounds: int, per_round: int) -> list[dict]:
    packed = model.module
    with torch.inference_mode():
        eager_out = packed(x)
    if not torch.equal(model.predict(x), eager_out):  # same logits, or the timing is moot
        raise AssertionError(f"{case}: kdengine.infer logits differ from the packed module's")

    def float_eager():
        with torch.inference_mode():
            return fnet(x)

    def packed_eager():
        with torch.inference_mode():
            return packed(x)

    fns = {"torch eager fp32": float_eager, "packed nn.Module eager": packed_eager,
           "kdengine.infer": lambda: model.predict(x)}
    times = interleaved_times(fns, rounds, per_round)
    stats = {k: latency_stats(v, int(x.shape[0])) for k, v in times.items()}
    ours = stats["kdengine.infer"]
    fp = stats["torch eager fp32"]
    weight_bytes = {
        "torch eager fp32": sum(p.numel() * p.element_size() for p in fnet.parameters()),
        "kdengine.infer": sum(t.numel() * t.element_size() for t in packed.state_dict().values()),
    }
    weight_bytes["packed nn.Module eager"] = weight_bytes["kdengine.infer"]
    rows = []
    for impl, st in stats.items():
        row = {
            "suite": "infer", "case": case, "shape": shape, "dtype": "float32", "impl": impl,
            "median_s": st.p50_ms / 1e3, "p50_ms": st.p50_ms, "p99_ms": st.p99_ms,
            "mean_ms": st.mean_ms, "min_ms": st.min_ms, "repeat": st.repeat,
            "kdengine_speedup": st.p50_ms / ours.p50_ms,
            "kdengine_speedup_p99": st.p99_ms / ours.p99_ms,
            "threads": torch.get_num_threads(), "state_bytes": weight_bytes[impl],
        }
        if impl == "kdengine.infer":
            row.update({"baseline": "torch eager fp32", "speedup": fp.p50_ms / ours.p50_ms,
                        "speedup_p99": fp.p99_ms / ours.p99_ms,
                        "prealloc_bytes": model.plan_summary(x)["prealloc_bytes"]})
        rows.append(row)
    return rows


def run_infer_bench(quick: bool = False, threads: tuple[int, ...] | None = None) -> list[dict]:
    """Rows ``{suite="infer", case, shape, dtype, impl, median_s, p50_ms, p99_ms,
    kdengine_speedup, ...}``: batch-1 CPU latency of ``mlp-bin3`` (target), ``mlp-fp1`` and ``vgg``,
    three implementations each (module docstring), at 1 thread and at torch's current thread
    count (both sides always run with the same count). ``quick``: hidden 2048 instead of 4096,
    a narrower vgg and fewer calls."""
    hidden = 2048 if quick else 4096
    width = 32 if quick else 64
    rounds, per_round = (3, 40) if quick else (5, 80)
    start = torch.get_num_threads()
    counts = threads or tuple(sorted({1, start}))
    rows: list[dict] = []
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 28, 28, generator=g)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cases = []
            for tag, binary_input in (("mlp-bin3", True), ("mlp-fp1", False)):
                fnet, bnet = mlp_pair(hidden, binary_input=binary_input)
                cases.append((f"{tag} 784-{hidden}-{hidden}-{hidden}-10", fnet,
                              _pack_and_load(bnet, tmp, tag), rounds))
            fnet, bnet = vgg_pair(width)
            cases.append((f"vgg {width}-{2 * width}-{4 * width}-fc1024", fnet,
                          _pack_and_load(bnet, tmp, "vgg"), rounds))
            del fnet, bnet
            for th in counts:
                torch.set_num_threads(th)
                for name, fnet, model, r in cases:
                    label = f"{name} b1 {th}t"
                    progress(f"infer {label}: fp32 eager, packed module, kdengine.infer")
                    for row in _case_rows(label, "1x1x28x28", fnet, model, x, r, per_round):
                        row["threads"] = th
                        rows.append(row)
    finally:
        torch.set_num_threads(start)
    return rows


def notes(rows: list[dict]) -> list[str]:
    """Neutral text lines: p99 of kdengine.infer against fp32 torch eager, per case (the table
    shows p50)."""
    return [f"infer {r['case']}: p99 {r['p99_ms']:.3f} ms vs fp32 eager {r['p99_ms'] * r['speedup_p99']:.3f} ms "
            f"({r['speedup_p99']:.1f}x)"
            for r in rows if r.get("suite") == "infer" and r["impl"] == "kdengine.infer" and "p99_ms" in r]


if __name__ == "__main__":  # pragma: no cover
    from kdengine.bench.report import suite_main

    suite_main(run_infer_bench, notes)
