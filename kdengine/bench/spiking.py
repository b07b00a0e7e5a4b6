"""Multi-step IF neuron benchmark: kdengine vs the best plain torch step loop vs SpikingJelly.

Same run, same inputs: T = 16, N = 2^20 neurons, fp32, reset by subtraction, atan surrogate;
forward alone and forward + backward. Effective bandwidth counts the bytes the fused algorithm
must move, for every implementation alike (so the fraction is a time ratio):

* forward: read x, write the spikes: 2 T N b (b = bytes per element);
* forward + backward: the forward, then read x (to recompute the potentials) and the incoming
  spike gradient and write the input gradient: 5 T N b.

``copy_fraction`` is that bandwidth over :func:`kdengine.bench.kd.copy_bandwidth` measured in the
same run (a copy into an already-touched buffer). Every implementation here allocates its
outputs, and first-touching fresh memory costs the kernel's page zeroing and faults on top of the
copy's traffic, so the forward also gets a floor row of the same bytes and allocation pattern:
``x.clone()`` (read x, write a fresh (T, N) tensor); ``clone_fraction`` = clone time / kdengine time.
The C++ backend takes its large outputs from a reuse pool (:mod:`kdengine.cpu_pool`), so repeated
calls skip those faults; the row ``kdengine[cpu], pool off`` times the same kernel with the pool
disabled (fresh memory every call, like the baselines), so both effects are on record.
"""
from __future__ import annotations

import math

import torch

from kdengine.bench.kd import copy_bandwidth
from kdengine.bench.timing import missing, progress, time_fn

FULL = (16, 1 << 20)
QUICK = (16, 1 << 16)
THRESHOLD = 1.0
ALPHA = 2.0  # atan sharpness (SpikingJelly's default)


def torch_if_loop(x: torch.Tensor, v_threshold: float = THRESHOLD) -> torch.Tensor:
    """The fastest plain torch forward found: in-place ops on one potential buffer, spikes written
    straight into the output (``torch.ge(out=float)`` beat a bool mask + copy 2x and a fresh
    ``(v >= thr).float()`` per step 2.4x here)."""
    out = torch.empty_like(x)
    v = torch.zeros_like(x[0])
    for t in range(x.shape[0]):
        v.add_(x[t])
        torch.ge(v, v_threshold, out=out[t])
        v.sub_(out[t], alpha=v_threshold)
    return out


class _TorchLoopIF(torch.autograd.Function):
    """The same loop with a hand-written in-place BPTT (atan surrogate, soft reset, attached
    reset): the best torch can do without autograd's per-step graph. Stores h in the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        h = torch.empty_like(x)
        v = torch.zeros_like(x[0])
        for t in range(x.shape[0]):
            v.add_(x[t])
            h[t].copy_(v)
            torch.ge(v, THRESHOLD, out=out[t])
            v.sub_(out[t], alpha=THRESHOLD)
        ctx.save_for_backward(h)
        return out

    @staticmethod
    def backward(ctx, gs: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        gx = torch.empty_like(h)
        c = torch.zeros_like(h[0])
        sg = torch.empty_like(h[0])
        k = math.pi / 2 * ALPHA
        for t in range(h.shape[0] - 1, -1, -1):
            # sg = (alpha/2) / (1 + (k (h - thr))^2)
            torch.sub(h[t], THRESHOLD, out=sg)
            sg.mul_(k).square_().add_(1.0).reciprocal_().mul_(ALPHA / 2)
            # g = gs sg + c (1 - thr sg) = c + sg (gs - thr c)
            g = gx[t]
            torch.sub(gs[t], c, alpha=THRESHOLD, out=g)
            g.mul_(sg).add_(c)
            c = g
        return gx


def torch_if_loop_autograd(x: torch.Tensor) -> torch.Tensor:
    return _TorchLoopIF.apply(x)


def kdengine_if(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    from kdengine.ops.if_multistep import if_multistep

    return if_multistep(x, THRESHOLD, None, surrogate="atan", alpha=ALPHA, backend=backend)


def kdengine_if_fresh(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """kdengine with the CPU output pool off: every call maps (and faults in) fresh output memory,
    as the torch baselines do. Shows what the pool (kdengine.cpu_pool) contributes."""
    from kdengine import cpu_pool

    old = cpu_pool.set_limit(0)
    try:
        return kdengine_if(x, backend)
    finally:
        cpu_pool.set_limit(old)


SPIKINGJELLY = "spikingjelly IFNode (torch)"


def spikingjelly_node():
    """SpikingJelly IFNode(step_mode='m'), soft reset, ATan(2): its torch backend on CPU (2.x has
    no backend argument and always runs torch there; older versions take backend='torch').
    None (and the reason recorded with :func:`kdengine.bench.timing.missing`) without it."""
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError as exc:
        missing("if_multistep", SPIKINGJELLY, f"spikingjelly is not importable ({exc})")
        return None
    kw = dict(v_threshold=THRESHOLD, v_reset=None, surrogate_function=surrogate.ATan(alpha=ALPHA),
              detach_reset=False, step_mode="m")
    try:
        return neuron.IFNode(backend="torch", **kw)
    except TypeError:
        return neuron.IFNode(**kw)


def _sj_fn(node):
    def run(x):
        node.reset()
        return node(x)

    return run


def _fwd(fn, x):
    def run():
        with torch.no_grad():
            fn(x)

    return run


def _fwd_bwd(fn, x, gs):
    def run():
        x.grad = None
        fn(x).backward(gs)

    return run


def run_spiking_bench(quick: bool = False, shape: tuple[int, int] | None = None,
                      repeat: int | None = None, with_spikingjelly: bool = True,
                      with_compile: bool = True, with_lif: bool = True) -> list[dict]:
    """Rows ``{suite, case, shape, dtype, impl, median_s, min_s, repeat, kdengine_speedup,
    effective_GBps, copy_GBps, copy_fraction}``, one per (case, implementation), CPU, fp32; the
    kdengine forward row adds ``clone_fraction``, and a ``floor: x.clone()`` row follows it.
    ``with_lif``: the LIF / parametric LIF rows of :mod:`kdengine.bench.spiking_lif` follow
    (``with_compile``: with their torch.compile baseline)."""
    import kdengine.ops.if_multistep  # noqa: F401  (registers the backends before resolving)
    from kdengine import _dispatch

    T, N = shape or (QUICK if quick else FULL)
    repeat = repeat or (3 if quick else 5)
    backend = _dispatch.resolve("if_multistep", torch.device("cpu"), "auto")
    bw = copy_bandwidth()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(T, N, generator=g) * 0.5 + 0.2).requires_grad_(True)
    gs = torch.randn(T, N, generator=g)
    b = x.element_size()
    impls = [
        (f"kdengine[{backend}]", lambda a: kdengine_if(a, backend)),
        ("torch in-place step loop", None),  # per case below
    ]
    if backend == "cpu":
        impls.insert(1, (f"kdengine[{backend}], pool off", lambda a: kdengine_if_fresh(a, backend)))
    node = spikingjelly_node() if with_spikingjelly else None
    if node is not None:
        impls.append((SPIKINGJELLY, _sj_fn(node)))
    ours = kdengine_if(x.detach(), backend)
    rows: list[dict] = []
    for case, nbytes in (("fwd", 2 * T * N * b), ("fwd+bwd", 5 * T * N * b)):
        case_rows = []
        for name, fn in impls:
            if fn is None:
                fn = torch_if_loop if case == "fwd" else torch_if_loop_autograd
            progress(f"if_multistep {case} T={T} N={N}: {name}")
            with torch.no_grad():
                if not torch.equal(fn(x.detach()), ours):  # same spikes, or the timing is moot
                    raise AssertionError(f"{name} spikes differ from kdengine's")
            run = _fwd(fn, x) if case == "fwd" else _fwd_bwd(fn, x, gs)
            r = time_fn(run, repeat=repeat, warmup=1)
            gbps = nbytes / r["median_s"] / 1e9
            case_rows.append({
                "suite": "if_multistep", "case": case, "shape": f"T={T} N={N}",
                "dtype": "float32", "impl": name, "median_s": r["median_s"], "min_s": r["min_s"],
                "repeat": repeat, "effective_GBps": gbps, "copy_GBps": bw / 1e9,
                "copy_fraction": gbps / (bw / 1e9),
            })
        t_ours = case_rows[0]["median_s"]
        if case == "fwd":  # the allocating-copy floor: same bytes, same fresh output
            progress(f"if_multistep {case} T={T} N={N}: floor x.clone()")
            r = time_fn(_fwd(torch.clone, x), repeat=repeat, warmup=1)
            case_rows[0]["clone_fraction"] = r["median_s"] / t_ours
            case_rows.append({
                "suite": "if_multistep", "case": case, "shape": f"T={T} N={N}",
                "dtype": "float32", "impl": "floor: x.clone()", "median_s": r["median_s"],
                "min_s": r["min_s"], "repeat": repeat,
                "effective_GBps": nbytes / r["median_s"] / 1e9,
                "copy_GBps": bw / 1e9, "copy_fraction": nbytes / r["median_s"] / bw,
            })
        for row in case_rows:
            row["kdengine_speedup"] = row["median_s"] / t_ours
        rows += case_rows
    if with_lif:
        from kdengine.bench.spiking_lif import run_lif_bench

        rows += run_lif_bench(quick=quick, shape=shape, repeat=repeat, with_compile=with_compile,
                              with_spikingjelly=with_spikingjelly)
    return rows


def notes(rows: list[dict]) -> list[str]:
    """Neutral text lines: kdengine's effective bandwidth against the copy bandwidth measured in
    the same run, and against an allocating copy of the same bytes."""
    lines = []
    for case in ("fwd", "fwd+bwd"):
        by = {r["impl"]: r for r in rows if r.get("suite") == "if_multistep" and r["case"] == case}
        ours = next((r for k, r in by.items() if k.startswith("kdengine")), None)
        if ours is None:
            continue
        lines.append(f"IF {case} {ours['shape']}: {ours['impl']} moves {ours['effective_GBps']:.2f} GB/s "
                     f"effective, {ours['copy_fraction'] * 100:.0f} % of the copy bandwidth measured in "
                     f"this run ({ours['copy_GBps']:.2f} GB/s)")
        if "clone_fraction" in ours:
            lines.append(f"IF {case} {ours['shape']}: x.clone() (same bytes, same fresh-output "
                         f"allocation) takes {ours['clone_fraction']:.2f}x kdengine's time")
    from kdengine.bench.spiking_lif import notes as lif_notes

    return lines + lif_notes(rows)


if __name__ == "__main__":  # pragma: no cover
    from kdengine.bench.report import suite_main

    suite_main(run_spiking_bench, notes)
