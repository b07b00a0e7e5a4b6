"""Training memory of a spiking CNN vs the number of time steps: memory-light BPTT vs plain autograd.

One training step (forward, cross-entropy, backward) of :class:`kdengine.models.ConvSNN` on random
1 x 28 x 28 images, kdengine's fused IF neuron in every arm:

* ``kdengine memory-light``: :mod:`kdengine.snn.memory_light` blocks (input spikes kept as 1 bit,
  synapse and neuron recomputed in the backward);
* ``plain autograd``: the same layers and parameters with plain autograd (the baseline; same
  gradients, bit for bit);
* SpikingJelly's ``IFNode`` (multi-step, torch backend, ATan) in the same architecture, plain
  autograd, when installed (for reference).

Two memory numbers per (T, arm), both measured, neither modelled:

* ``saved_MB``: the bytes autograd keeps between the forward and the backward, summed over the
  distinct storages of every saved tensor (``torch.autograd.graph.saved_tensors_hooks``),
  parameters and buffers excluded;
* ``peak_rss_MB``: the growth of the process's peak resident set (Linux ``VmHWM``, reset before
  the step) over one training step in a fresh subprocess per configuration, after a warm-up step
  on a 2-image batch (native kernels loaded). The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``
  so glibc maps every large tensor afresh and returns it when freed, and with kdengine's kernel
  output pool off (``KDENGINE_CPU_POOL_MB=0``: the pool keeps freed outputs resident for reuse, by
  design): the resident set then follows the live tensors. It includes everything alive at the
  peak (activations, the backward's working set, gradients). For this 3-block net the peak is set
  by the largest block's backward (its recomputed graph, or in plain autograd its saved tensors
  plus the gradients in flight), so it shrinks far less than the saved bytes do.

``median_s`` is the in-process step time (the recompute costs one more forward per block).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdengine.bench.timing import missing, peak_from_child, progress, time_fn

FULL = dict(steps=(4, 8, 16, 32), batch=32, channels=(16, 32), hidden=128)
QUICK = dict(steps=(4, 8), batch=8, channels=(8, 16), hidden=64)
LIGHT = "kdengine memory-light"
PLAIN = "plain autograd (kdengine IF)"
SPIKINGJELLY = "spikingjelly IFNode (torch), plain autograd"
IMPLS = {"light": LIGHT, "plain": PLAIN, "spikingjelly": SPIKINGJELLY}
SUITE = "snn_memory"


def spikingjelly_if_factory():
    """A factory of SpikingJelly ``IFNode(step_mode="m")`` with kdengine's default SNN neuron
    settings (threshold 1, hard reset to 0, ATan(2), reset attached); None without SpikingJelly."""
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError:
        return None

    def make() -> nn.Module:
        return neuron.IFNode(v_threshold=1.0, v_reset=0.0, surrogate_function=surrogate.ATan(alpha=2.0),
                             detach_reset=False, step_mode="m")

    return make


def build(impl: str, time_steps: int, channels: Sequence[int], hidden: int, seed: int = 0) -> nn.Module:
    """The ConvSNN of arm ``impl`` (``light``, ``plain`` or ``spikingjelly``), seeded."""
    from kdengine.models import ConvSNN

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    factory = spikingjelly_if_factory() if impl == "spikingjelly" else None
    if impl == "spikingjelly" and factory is None:
        raise RuntimeError("spikingjelly is not importable")
    torch.manual_seed(seed)
    return ConvSNN(factory, channels=tuple(channels), hidden=hidden, time_steps=time_steps,
                   memory_light=impl == "light")


def batch_of(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward, cross-entropy, backward (gradients accumulate into ``.grad``); the loss."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the distinct storages that autograd keeps for the backward of one training step,
    parameters and buffers excluded (then runs the backward)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    total = sum(storages.values())
    loss.backward()
    return total


def peak_rss_bytes(impl: str, time_steps: int, batch: int, channels: Sequence[int], hidden: int,
                   threads: Optional[int] = None) -> Optional[float]:
    """Peak RSS growth of one training step in a fresh process (see the module doc); None if the
    child failed."""
    cmd = [sys.executable, "-m", "kdengine.bench.snn_memory", "--child", "--impl", impl, "--steps",
           str(time_steps), "--batch", str(batch), "--channels", *map(str, channels), "--hidden", str(hidden),
           "--threads", str(threads or torch.get_num_threads())]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", KDENGINE_CPU_POOL_MB="0")
    return peak_from_child(cmd, env=env, label=f"{impl} T={time_steps}")


def run_snn_memory_bench(quick: bool = False, steps: Optional[Sequence[int]] = None, batch: Optional[int] = None,
                         repeat: Optional[int] = None, with_rss: bool = True, with_spikingjelly: bool = True,
                         channels: Optional[Sequence[int]] = None, hidden: Optional[int] = None) -> list[dict]:
    """Rows ``{suite, case, shape, dtype, impl, median_s, min_s, repeat, saved_MB, peak_rss_MB,
    kdengine_speedup}``, one per (T, arm); ``kdengine_speedup`` = arm time / memory-light time."""
    cfg = QUICK if quick else FULL
    steps = tuple(steps or cfg["steps"])
    batch = batch or cfg["batch"]
    repeat = repeat or (2 if quick else 3)
    channels, hidden = tuple(channels or cfg["channels"]), hidden or cfg["hidden"]
    impls = ["light", "plain"]
    if with_spikingjelly:
        if spikingjelly_if_factory() is None:
            missing(SUITE, SPIKINGJELLY, "spikingjelly is not importable")
        else:
            impls.append("spikingjelly")
    x, y = batch_of(batch)
    rows: list[dict] = []
    for T in steps:
        shape = f"T={T} B={batch} ch={channels[0]},{channels[1]} fc={hidden}"
        grads: dict[str, list] = {}
        case_rows = []
        for impl in impls:
            progress(f"{SUITE} fwd+bwd {shape}: {IMPLS[impl]}")
            model = build(impl, T, channels, hidden)
            saved = saved_bytes(model, x, y)
            grads[impl] = [p.grad.clone() for p in model.parameters()]
            r = time_fn(lambda m=model: train_step(m, x, y), repeat=repeat, warmup=1)
            row = {"suite": SUITE, "case": "fwd+bwd", "shape": shape, "dtype": "float32", "impl": IMPLS[impl],
                   "time_steps": T, "batch": batch, "median_s": r["median_s"], "min_s": r["min_s"],
                   "repeat": repeat, "saved_MB": saved / 2**20}
            if with_rss:
                progress(f"{SUITE} fwd+bwd {shape}: peak RSS of {IMPLS[impl]} (fresh process)")
                peak = peak_rss_bytes(impl, T, batch, channels, hidden)
                row["peak_rss_MB"] = None if peak is None else peak / 2**20
            case_rows.append(row)
        # the memory-light arm must compute what the plain one does, or its numbers are moot
        if not all(torch.equal(a, b) for a, b in zip(grads["light"], grads["plain"])):
            raise AssertionError(f"memory-light gradients differ from plain autograd at {shape}")
        t_light = case_rows[0]["median_s"]
        for row in case_rows:
            row["kdengine_speedup"] = row["median_s"] / t_light
        rows += case_rows
    return rows


def notes(rows: list[dict]) -> list[str]:
    """Neutral lines: per T, the saved bytes and the peak RSS growth of each arm, and the ratios
    plain / memory-light."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows if r.get("suite") == SUITE):
        by = {r["impl"]: r for r in rows if r.get("suite") == SUITE and r["shape"] == shape}
        light, plain = by.get(LIGHT), by.get(PLAIN)
        if light is None or plain is None:
            continue
        text = (f"SNN training step {shape}: autograd keeps {light['saved_MB']:.2f} MiB memory-light vs "
                f"{plain['saved_MB']:.2f} MiB plain ({plain['saved_MB'] / max(light['saved_MB'], 1e-9):.1f}x)")
        if light.get("peak_rss_MB") and plain.get("peak_rss_MB"):
            text += (f"; peak RSS growth {light['peak_rss_MB']:.1f} MiB vs {plain['peak_rss_MB']:.1f} MiB "
                     f"({plain['peak_rss_MB'] / light['peak_rss_MB']:.2f}x)")
        sj = by.get(SPIKINGJELLY)
        if sj is not None:
            text += f"; SpikingJelly IFNode keeps {sj['saved_MB']:.2f} MiB"
            if sj.get("peak_rss_MB"):
                text += f", peak RSS growth {sj['peak_rss_MB']:.1f} MiB"
        text += (f"; step time {light['median_s'] * 1e3:.0f} ms memory-light vs {plain['median_s'] * 1e3:.0f} ms "
                 "plain")
        lines.append(text)
    return lines


def _child() -> None:
    from kdengine.bench.kd_mem import _reset_peak, _status_kb

    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--impl", choices=list(IMPLS), required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--channels", type=int, nargs=2, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build(a.impl, a.steps, a.channels, a.hidden)
    train_step(model, *batch_of(2, seed=1))  # load the kernels, allocate the gradients
    x, y = batch_of(a.batch)
    before = _status_kb("VmRSS")
    _reset_peak()
    train_step(model, x, y)
    print(json.dumps({"peak_delta_bytes": _status_kb("VmHWM") - before}))


if __name__ == "__main__":  # pragma: no cover
    if "--child" in sys.argv:
        _child()
    else:
        from kdengine.bench.report import format_columns

        out = run_snn_memory_bench(quick="--quick" in sys.argv)
        print(format_columns(out, ["shape", "impl", "median_s", "saved_MB", "peak_rss_MB"]))
        print("\n".join(notes(out)))
