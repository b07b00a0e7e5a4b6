"""Multi-step LIF / parametric LIF benchmark: kdengine vs the best torch step loops vs SpikingJelly.

Same run, same inputs: T = 16, N = 2^20 neurons, fp32, SpikingJelly's default neuron (tau = 2,
decay_input, threshold 1, hard reset to 0, sigmoid surrogate alpha = 4); the parametric neuron
learns 1/tau = sigmoid(w) (w = 0: tau = 2), so its backward also reduces dL/dw over neurons and
steps. Forward + backward (and the LIF forward alone). Baselines:

* ``torch eager loop``: an in-place step loop with a hand-written in-place BPTT (an
  autograd.Function; no per-step autograd graph), the fastest plain torch found;
* ``torch.compile loop``: the functional step loop with a surrogate autograd.Function, compiled by
  inductor (forward and backward fused across the unrolled T steps as inductor sees fit);
* SpikingJelly's ``LIFNode`` / ``ParametricLIFNode`` (``step_mode="m"``; on CPU SpikingJelly 2.x
  runs its torch loop, there is no other CPU backend).

Effective bandwidth counts what the fused algorithm must move: forward 2 T N b (read x, write
spikes), forward + backward 5 T N b (+ re-read x, read the spike gradient, write the x gradient);
the parametric neuron's leak gradient reads x once more: 6 T N b.
"""
from __future__ import annotations

import functools

import torch

from kdengine.bench.timing import missing, progress, time_fn

FULL = (16, 1 << 20)
QUICK = (16, 1 << 16)
THRESHOLD = 1.0
LIF_TAU = 2.0
LIF_RESET = 0.0
LIF_ALPHA = 4.0  # SpikingJelly's Sigmoid() default
PLIF_W = 0.0  # 1/tau = sigmoid(0) = 0.5


def _sg(u: torch.Tensor) -> torch.Tensor:
    """Sigmoid surrogate derivative alpha s (1 - s), s = sigmoid(alpha u)."""
    s = torch.sigmoid(LIF_ALPHA * u)
    return LIF_ALPHA * s * (1 - s)


class _EagerLIF(torch.autograd.Function):
    """In-place forward over T (keeps h) and an in-place reverse loop: hard reset to 0,
    decay_input, attached reset. ``w`` None: tau = 2 (divide); else k = sigmoid(w) (multiply)."""

    @staticmethod
    def forward(ctx, x, w):
        k = None if w is None else torch.sigmoid(w.float())
        out = torch.empty_like(x)
        h = torch.empty_like(x)
        v = torch.zeros_like(x[0])
        a = torch.empty_like(v)
        for t in range(x.shape[0]):
            torch.sub(v, LIF_RESET, out=a)
            torch.sub(x[t], a, out=a)
            a.div_(LIF_TAU) if k is None else a.mul_(k)
            v.add_(a)
            h[t].copy_(v)
            fire = torch.ge(v, THRESHOLD)
            out[t].copy_(fire)
            v.masked_fill_(fire, LIF_RESET)
        ctx.save_for_backward(x, h, k)
        ctx.has_w = w is not None
        return out

    @staticmethod
    def backward(ctx, gs):
        x, h, k = ctx.saved_tensors
        q = 1.0 / LIF_TAU if k is None else k
        gx = torch.empty_like(h)
        c = torch.zeros_like(h[0])
        gk = torch.zeros_like(h[0]) if ctx.has_w else None
        for t in range(h.shape[0] - 1, -1, -1):
            ht = h[t]
            sg = _sg(ht - THRESHOLD)
            # dv/dh = (1 - s) + (r - h) sg;  g = gs sg + c dv/dh
            dvdh = torch.lt(ht, THRESHOLD).float().add_((LIF_RESET - ht).mul_(sg))
            g = gs[t] * sg
            g.addcmul_(c, dvdh)
            torch.mul(g, q, out=gx[t])
            if gk is not None:  # dh/dk = x_t - (v_{t-1} - r), v_{t-1} = reset(h_{t-1})
                vp = (torch.where(h[t - 1] >= THRESHOLD, LIF_RESET, h[t - 1]) if t > 0
                      else torch.zeros_like(ht))
                gk.addcmul_(g, x[t] - (vp - LIF_RESET))
            c = g.sub_(gx[t])
        gw = None
        if ctx.has_w:
            gw = gk.sum() * k * (1 - k)
        return gx, gw


def torch_lif_loop(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """The eager baseline: LIF (w None, tau = 2) or PLIF (k = sigmoid(w))."""
    return _EagerLIF.apply(x, w)


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return g * _sg(u)


def torch_lif_functional(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """The functional step loop (autograd through every step) that the compiled baseline runs."""
    k = None if w is None else torch.sigmoid(w.float())
    v = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        a = x[t] - (v - LIF_RESET)
        h = v + (a / LIF_TAU if k is None else a * k)
        s = _Spike.apply(h - THRESHOLD)
        v = s * LIF_RESET + (1 - s) * h
        out.append(s)
    return torch.stack(out)


@functools.lru_cache(maxsize=None)
def _compiled():
    return torch.compile(torch_lif_functional)


def torch_lif_loop_compiled(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`torch_lif_functional` under torch.compile (inductor; compiles on first use)."""
    return _compiled()(x, w)


def kdengine_lif(x: torch.Tensor, w: torch.Tensor | None = None, backend: str | None = None):
    from kdengine.ops.lif_multistep import lif_multistep

    kw = dict(tau=LIF_TAU) if w is None else dict(decay=torch.sigmoid(w.float()))
    return lif_multistep(x, v_threshold=THRESHOLD, v_reset=LIF_RESET, surrogate="sigmoid",
                         alpha=LIF_ALPHA, backend=backend, **kw)


def spikingjelly_node(parametric: bool):
    """SpikingJelly's LIFNode / ParametricLIFNode (step_mode='m') with this benchmark's neuron,
    or None (recorded with :func:`missing`) when SpikingJelly is not importable."""
    name = "ParametricLIFNode" if parametric else "LIFNode"
    try:
        from spikingjelly.activation_based import neuron, surrogate
    except ImportError as exc:
        missing("lif_multistep", f"spikingjelly {name}", f"spikingjelly is not importable ({exc})")
        return None
    kw = dict(decay_input=True, v_threshold=THRESHOLD, v_reset=LIF_RESET, detach_reset=False,
              surrogate_function=surrogate.Sigmoid(alpha=LIF_ALPHA), step_mode="m")
    if parametric:
        return neuron.ParametricLIFNode(init_tau=1.0 / torch.sigmoid(torch.tensor(PLIF_W)).item(), **kw)
    return neuron.LIFNode(tau=LIF_TAU, **kw)


def run_lif_bench(quick: bool = False, shape: tuple[int, int] | None = None,
                  repeat: int | None = None, with_compile: bool = True,
                  with_spikingjelly: bool = True) -> list[dict]:
    """Rows ``{suite, case, shape, dtype, impl, median_s, min_s, repeat, kdengine_speedup,
    effective_GBps}`` for LIF fwd, LIF fwd+bwd and PLIF fwd+bwd, CPU fp32."""
    import kdengine.ops.lif_multistep  # noqa: F401  (registers the backends)
    from kdengine import _dispatch

    T, N = shape or (QUICK if quick else FULL)
    repeat = repeat or (3 if quick else 5)
    backend = _dispatch.resolve("lif_multistep", torch.device("cpu"), "auto")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(T, N, generator=g) * 0.8 + 0.6).requires_grad_(True)
    gs = torch.randn(T, N, generator=g)
    b = x.element_size()
    rows: list[dict] = []
    for case, parametric, bwd, nbytes in (("LIF fwd", False, False, 2 * T * N * b),
                                          ("LIF fwd+bwd", False, True, 5 * T * N * b),
                                          ("PLIF fwd+bwd", True, True, 6 * T * N * b)):
        w = torch.tensor(PLIF_W, requires_grad=True) if parametric else None
        impls = [(f"kdengine[{backend}]", lambda a, w=w: kdengine_lif(a, w, backend)),
                 ("torch eager loop", torch_lif_loop)]
        if with_compile:
            impls.append(("torch.compile loop", torch_lif_loop_compiled))
        node = spikingjelly_node(parametric) if with_spikingjelly else None
        if node is not None:
            def sj(a, w=None, node=node):
                node.reset()
                return node(a)
            impls.append((f"spikingjelly {type(node).__name__} (torch)", sj))
        ours = kdengine_lif(x.detach(), w, backend)
        case_rows = []
        for name, fn in impls:
            progress(f"lif_multistep {case} T={T} N={N}: {name}")
            with torch.no_grad():
                if not torch.equal(fn(x.detach(), w), ours):  # same spikes, or the timing is moot
                    raise AssertionError(f"{name} spikes differ from kdengine's")

            if bwd:
                def run(fn=fn, w=w):
                    x.grad = None
                    fn(x, w).backward(gs)
            else:
                def run(fn=fn, w=w):
                    with torch.no_grad():
                        fn(x, w)
            r = time_fn(run, repeat=repeat, warmup=2 if "compile" in name else 1)
            case_rows.append({
                "suite": "lif_multistep", "case": case, "shape": f"T={T} N={N}", "dtype": "float32",
                "impl": name, "median_s": r["median_s"], "min_s": r["min_s"], "repeat": repeat,
                "effective_GBps": nbytes / r["median_s"] / 1e9,
            })
        for row in case_rows:
            row["kdengine_speedup"] = row["median_s"] / case_rows[0]["median_s"]
        rows += case_rows
    return rows


def notes(rows: list[dict]) -> list[str]:
    """kdengine's time against the fastest torch loop and SpikingJelly, per case."""
    lines = []
    for case in ("LIF fwd", "LIF fwd+bwd", "PLIF fwd+bwd"):
        by = [r for r in rows if r.get("suite") == "lif_multistep" and r["case"] == case]
        if not by:
            continue
        ours = by[0]
        loops = [r for r in by if r["impl"].startswith("torch")]
        sj = [r for r in by if r["impl"].startswith("spikingjelly")]
        text = f"{case} {ours['shape']}: {ours['impl']} {ours['effective_GBps']:.2f} GB/s effective"
        if loops:
            best = min(loops, key=lambda r: r["median_s"])
            text += f"; {best['kdengine_speedup']:.1f}x faster than the best torch loop ({best['impl']})"
        if sj:
            text += f", {sj[0]['kdengine_speedup']:.1f}x faster than {sj[0]['impl']}"
        lines.append(text)
    return lines
