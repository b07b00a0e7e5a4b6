"""if_multistep: every backend against the reference step loop (the spec), with the same tests.

Forward: spikes and final potentials must be *identical* to the reference run in the same state
dtype (the kernels do the same additions in the same order). Backward: against autograd of the
reference, and against finite differences of a smooth model (see test_gradcheck_surrogate_model).
Shapes stay tiny so the Triton interpreter (CPU) can run every case. Fresh random inputs per run.
"""
from __future__ import annotations

import math

import pytest
import torch

from kdengine import _dispatch
from kdengine.ops.if_multistep import if_multistep
from kdengine.ops.if_multistep.reference import surrogate_primitive
from tests.backend_params import backend_params

BACKENDS = backend_params("if_multistep")
SURROGATES = ["atan", "sigmoid"]
RESETS = [None, -0.25]  # reset by subtraction, hard reset
RESET_IDS = ["soft", "hard"]
SHAPES = [(1, 5), (7, 3, 11), (16, 130)]  # T = 1; odd sizes and an extra neuron dim; T = 16
THR = 0.7  # not a power of two: fp32(0.7) != 0.7, so threshold rounding matters


def _x(shape, dtype=torch.float32, scale=0.8, bias=0.25):
    return (torch.randn(*shape, dtype=torch.float64) * scale + bias).to(dtype)


def _state(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run(backend, x, gs, gv=None, v_init=None, thr=THR, **kw):
    """Spikes, final v and the gradients of sum(gs * spikes) + sum(gv * v) w.r.t. x and v_init."""
    x = x.detach().clone().requires_grad_(True)
    v0 = None if v_init is None else v_init.detach().clone().requires_grad_(True)
    s, v = if_multistep(x, thr, kw.pop("v_reset", None), v_init=v0, return_v=True,
                        backend=backend, **kw)
    loss = (s.to(gs.dtype) * gs).sum()
    if gv is not None:
        loss = loss + (v.to(gv.dtype) * gv).sum()
    loss.backward()
    return s.detach(), v.detach(), x.grad, (None if v0 is None else v0.grad)


def _close(actual, expected, rtol, atol, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=what)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
def test_forward_equals_reference_exactly(backend, shape, dtype, v_reset, seed):
    x = _x(shape, dtype)
    s, v = if_multistep(x, THR, v_reset, return_v=True, backend=backend)
    rs, rv = if_multistep(x, THR, v_reset, return_v=True, backend="reference")
    assert s.dtype == dtype and s.shape == x.shape and v.shape == x.shape[1:] and v.dtype == dtype
    assert torch.equal(s, rs), f"spikes differ, seed={seed}"
    assert torch.equal(v, rv), f"final potential differs, seed={seed}"
    assert 0 < int(s.sum()) < s.numel() or shape[0] == 1, "inputs should make some neurons fire"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
def test_inference_fast_path_equals_autograd_path(backend, v_reset, seed):
    """Without grad the entry point calls the kernel directly (no custom-op machinery); with grad
    it goes through the torch.library op. Same spikes, same final potential."""
    x = _x((9, 4, 13))
    v0 = torch.rand(4, 13) * THR
    with torch.no_grad():
        s0, v_0 = if_multistep(x, THR, v_reset, v_init=v0, return_v=True, backend=backend)
    s1, v_1, _, _ = _run(backend, x, torch.ones(9, 4, 13), v_init=v0, v_reset=v_reset)
    assert torch.equal(s0, s1) and torch.equal(v_0, v_1)
    assert not s0.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
def test_forward_with_v_init_and_ties_at_threshold(backend, v_reset, seed):
    # Inputs on a 1/8 grid with theta = 1: potentials hit the threshold exactly (s = 1 at v == theta).
    x = torch.randint(-4, 9, (9, 37)).double().div(8).float()
    v0 = torch.randint(-8, 8, (37,)).double().div(8).float()
    s, v = if_multistep(x, 1.0, v_reset, v_init=v0, return_v=True, backend=backend)
    rs, rv = if_multistep(x, 1.0, v_reset, v_init=v0, return_v=True, backend="reference")
    assert torch.equal(s, rs) and torch.equal(v, rv)
    # A hand-checked neuron: inputs 0.5, 0.5 -> h = 1.0 fires at t = 1 (>=), soft reset to 0.
    x1 = torch.tensor([[0.5], [0.5], [0.25]])
    s1, v1 = if_multistep(x1, 1.0, v_reset, v_init=torch.zeros(1), return_v=True, backend=backend)
    assert s1.flatten().tolist() == [0.0, 1.0, 0.0]
    assert v1.item() == (0.25 if v_reset is None else v_reset + 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_reset_rests_at_v_reset_by_default(backend):
    # SpikingJelly starts hard-reset neurons at v_reset: no input, no spike, v stays v_reset.
    x = torch.zeros(3, 4)
    s, v = if_multistep(x, 1.0, -0.5, return_v=True, backend=backend)
    assert bool((s == 0).all()) and bool((v == -0.5).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, seed):
    base = _x((6, 9, 5))
    x = base.transpose(1, 2)  # (6, 5, 9) view
    s = if_multistep(x, THR, backend=backend)
    assert torch.equal(s, if_multistep(x.contiguous(), THR, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
def test_nan_in_gives_nan_out(backend, v_reset):
    x = _x((5, 6))
    x[2, 3] = float("nan")
    s, v = if_multistep(x, THR, v_reset, return_v=True, backend=backend)
    assert bool(torch.isnan(s[2:, 3]).all()) and bool(torch.isnan(v[3]))
    keep = [0, 1, 2, 4, 5]
    assert bool(torch.isfinite(s[:, keep]).all()) and bool(torch.isfinite(v[keep]).all())
    assert bool(torch.isfinite(s[:2, 3]).all())


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_backward_matches_autograd_of_reference(backend, surrogate, v_reset, detach_reset, dtype,
                                                seed):
    shape = (7, 3, 11)
    x = _x(shape, dtype)
    sd = _state(dtype)
    v0 = (torch.randn(shape[1:], dtype=torch.float64) * 0.5).to(sd)
    gs = torch.randn(shape, dtype=torch.float64).to(dtype)
    gv = torch.randn(shape[1:], dtype=torch.float64).to(dtype)
    kw = dict(surrogate=surrogate, v_reset=v_reset, detach_reset=detach_reset, alpha=3.0)
    s, v, gx, g0 = _run(backend, x, gs, gv, v0, **kw)
    rs, rv, rgx, rg0 = _run("reference", x, gs, gv, v0, **kw)
    assert torch.equal(s, rs) and torch.equal(v, rv)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-13)
    _close(gx, rgx, rtol, atol, f"grad x, seed={seed}")
    _close(g0, rg0, rtol, atol, f"grad v_init, seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
def test_fp32_matches_float64_reference(backend, surrogate, v_reset, seed):
    """On a 1/64 grid (threshold and reset on it too) every potential is exact in fp32, so the
    fp32 kernel and the float64 reference walk the same trajectory; gradients then agree to fp32
    rounding."""
    shape = (12, 40)
    x = torch.round(_x(shape, torch.float64) * 64) / 64
    gs = torch.randn(shape, dtype=torch.float64)
    gv = torch.randn(shape[1:], dtype=torch.float64)
    kw = dict(surrogate=surrogate, v_reset=v_reset, thr=1.0)
    s, v, gx, _ = _run(backend, x.float(), gs.float(), gv.float(), **kw)
    rs, rv, rgx, _ = _run("reference", x, gs, gv, **kw)
    assert torch.equal(s.double(), rs) and torch.equal(v.double(), rv)
    torch.testing.assert_close(gx.double(), rgx, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_only_final_potential_used(backend, surrogate, seed):
    """Backward with no gradient reaching the spikes (gs = None inside the op)."""
    x = _x((6, 17)).requires_grad_(True)
    _, v = if_multistep(x, THR, return_v=True, surrogate=surrogate, backend=backend)
    (g,) = torch.autograd.grad(v.sum(), x)
    xr = x.detach().clone().requires_grad_(True)
    _, vr = if_multistep(xr, THR, return_v=True, surrogate=surrogate, backend="reference")
    (gr,) = torch.autograd.grad(vr.sum(), xr)
    _close(g, gr, 1e-5, 1e-6, f"seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("surrogate", SURROGATES)
def test_low_precision_input(backend, dtype, surrogate, seed):
    """bf16/fp16 x: the state is fp32, so the trajectory equals the fp32 run on x.float(); the
    gradient is formed in fp32 and rounded once: within one ulp of the fp32 gradient."""
    shape = (9, 3, 7)
    x = _x(shape, dtype)
    gs = torch.randn(shape, dtype=torch.float64).to(dtype)
    s, v, gx, _ = _run(backend, x, gs, surrogate=surrogate)
    s32, v32, gx32, _ = _run("reference", x.float(), gs.float(), surrogate=surrogate)
    assert s.dtype == dtype and gx.dtype == dtype
    assert torch.equal(s.float(), s32)
    fi = torch.finfo(dtype)
    err = (gx.float() - gx32).abs()
    assert bool((err <= fi.eps * gx32.abs() + fi.tiny).all()), f"max err {float(err.max())}"


def _trajectory(x, v0, v_reset):
    """Hard spikes and pre-reset potentials h of the float64 reference run (T, N)."""
    with torch.no_grad():
        s = if_multistep(x, THR, v_reset, v_init=v0, backend="reference")
        v, hs = v0.clone(), []
        for t in range(x.shape[0]):
            h = v + x[t]
            hs.append(h)
            after = (h - THR) if v_reset is None else torch.full_like(h, v_reset)
            v = torch.where(s[t] == 1, after, h)
    return s, torch.stack(hs)


def _frozen_spike_model(x, v0, s0, u0, thr, v_reset, surrogate, alpha, detach_reset):
    """A smooth model that equals the hard forward at the base point (spikes s0, potentials
    u0 = h0 - theta) and whose derivative there is exactly the surrogate-gradient backward:
    spike_t = s0_t + p(u_t) - p(u0_t) with p' = the surrogate derivative."""
    v, out = v0, []
    for t in range(x.shape[0]):
        h = v + x[t]
        u = h - thr
        s = s0[t] + (surrogate_primitive(u, surrogate, alpha) - surrogate_primitive(u0[t], surrogate, alpha))
        s_r = s0[t] if detach_reset else s
        v = h - s_r * thr if v_reset is None else s_r * v_reset + (1 - s_r) * h
        out.append(s)
    return torch.stack(out), v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
def test_gradcheck_surrogate_model(backend, surrogate, v_reset, detach_reset, seed):
    """gradcheck where it means something. The spikes are a step function of x: finite
    differences see 0 (or a jump), never the surrogate, so gradcheck of if_multistep itself must
    fail. Instead: a Function whose forward is the smooth frozen-spike model above and whose
    backward is the kernel's backward at the base point. gradcheck's analytical Jacobian comes
    from the kernel, its numerical one from finite differences of the model, so this checks the
    fused backward (surrogate formula, alpha scaling, reset terms, v_init and v_final paths)
    against calculus, independently of autograd of the reference."""
    alpha = 1.7
    T, N = 5, 4
    x0 = _x((T, N), torch.float64)
    v00 = torch.randn(N, dtype=torch.float64) * 0.3
    s0, h0 = _trajectory(x0, v00, v_reset)  # base point: hard spikes, pre-reset potentials
    u0 = h0 - THR

    class KernelVJP(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, v_init):
            ctx.save_for_backward(x, v_init)
            return _frozen_spike_model(x, v_init, s0, u0, THR, v_reset, surrogate, alpha,
                                       detach_reset)

        @staticmethod
        def backward(ctx, gs, gv):
            x, v_init = ctx.saved_tensors
            with torch.enable_grad():
                xl = x.detach().requires_grad_(True)
                vl = v_init.detach().requires_grad_(True)
                s, v = if_multistep(xl, THR, v_reset, v_init=vl, return_v=True, backend=backend,
                                    surrogate=surrogate, alpha=alpha, detach_reset=detach_reset)
                gs = torch.zeros_like(s) if gs is None else gs
                gv = torch.zeros_like(v) if gv is None else gv
                return torch.autograd.grad((s, v), (xl, vl), (gs, gv))

    x = x0.clone().requires_grad_(True)
    v0 = v00.clone().requires_grad_(True)
    assert torch.equal(KernelVJP.apply(x, v0)[0], s0)  # the model is the forward at the base point
    assert torch.autograd.gradcheck(KernelVJP.apply, (x, v0), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
def test_gradcheck_potential_path_detached(backend, v_reset, seed):
    """With detach_reset and only the final potential as output, the op is piecewise smooth and
    its backward is the true derivative (1 per step for the soft reset, prod (1 - s) for the hard
    one): plain gradcheck of if_multistep applies, away from threshold crossings."""
    x = _x((6, 5), torch.float64)
    v0 = torch.randn(5, dtype=torch.float64) * 0.3
    for _ in range(100):  # keep every potential at least 1e-3 away from the threshold
        _, h = _trajectory(x, v0, v_reset)
        if bool(((h - THR).abs() > 1e-3).all()):
            break
        x = _x((6, 5), torch.float64)
    fn = lambda a, b: if_multistep(a, THR, v_reset, v_init=b, return_v=True, detach_reset=True,  # noqa: E731
                                   backend=backend)[1]
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), v0.requires_grad_(True)),
                                    eps=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_chunked_stream_equals_one_long_run(backend, v_reset, dtype, seed):
    x = _x((11, 2, 9), dtype)
    gs = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    kw = dict(v_reset=v_reset, surrogate="sigmoid")
    s_all, v_all, g_all, _ = _run(backend, x, gs, **kw)

    xl = x.detach().clone().requires_grad_(True)
    v, chunks = None, []
    for lo, hi in ((0, 4), (4, 5), (5, 11)):  # chunk lengths 4, 1, 6
        s, v = if_multistep(xl[lo:hi], THR, v_reset, v_init=v, return_v=True, backend=backend,
                            surrogate="sigmoid")
        chunks.append(s)
    s_chunks = torch.cat(chunks)
    (s_chunks.to(gs.dtype) * gs).sum().backward()
    assert torch.equal(s_chunks.detach(), s_all) and torch.equal(v.detach(), v_all)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-13)
    _close(xl.grad, g_all, rtol, atol, f"gradient through the chunk boundary, seed={seed}")


# --------------------------------------------------------------------------- SpikingJelly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("v_reset", [None, 0.0, -0.25], ids=["soft", "hard0", "hard"])
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_equals_spikingjelly_ifnode(backend, surrogate, v_reset, detach_reset, dtype, seed):
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    fn = {"atan": sj_surrogate.ATan, "sigmoid": sj_surrogate.Sigmoid}[surrogate](alpha=2.5)
    node = sj_neuron.IFNode(v_threshold=THR, v_reset=v_reset, surrogate_function=fn,
                            detach_reset=detach_reset, step_mode="m")
    x = _x((8, 3, 13), dtype)
    gs = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    xs = x.clone().requires_grad_(True)
    s_sj = node(xs)
    (s_sj * gs).sum().backward()
    s, v, gx, _ = _run(backend, x, gs, v_reset=v_reset, surrogate=surrogate, alpha=2.5,
                       detach_reset=detach_reset)
    assert torch.equal(s, s_sj.detach()), f"spikes differ from SpikingJelly, seed={seed}"
    assert torch.equal(v, node.v.detach().to(dtype))
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-13)
    _close(gx, xs.grad, rtol, atol, f"gradient vs SpikingJelly, seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_equals_spikingjelly_with_fp32_state(backend, seed):
    """SpikingJelly's IFNode keeps a bf16 state for bf16 input on CPU; its functional form with an
    fp32 state is what kdengine computes."""
    sj_functional = pytest.importorskip("spikingjelly.activation_based.functional")
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    x = _x((8, 40), torch.bfloat16)
    s_sj, v_sj, _ = sj_functional.if_multi_step(x, torch.zeros(40), THR, None,
                                                sj_surrogate.ATan(), False)
    s, v = if_multistep(x, THR, return_v=True, backend=backend)
    assert torch.equal(s, s_sj) and torch.equal(v, v_sj.to(torch.bfloat16))


# --------------------------------------------------------------------------- compile, dispatch


def test_auto_backend_on_cpu_is_the_native_one_when_it_builds():
    avail = _dispatch.backend_availability("cpu", "cpu")
    expected = "cpu" if avail.available else "reference"
    assert _dispatch.resolve("if_multistep", torch.device("cpu"), "auto") == expected


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("cpu", "reference")])
def test_torch_compile(backend, seed):
    x = _x((5, 3, 7)).requires_grad_(True)

    def f(a):
        s, v = if_multistep(a, THR, -0.1, return_v=True, backend=backend, surrogate="sigmoid")
        return (s * torch.arange(7.0)).sum() + v.square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (g,) = torch.autograd.grad(out, x)
    xr = x.detach().clone().requires_grad_(True)
    ref = f(xr)
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, gr)


def test_bench_baselines_compute_the_same_thing(seed):
    """The benchmark's torch loops (forward and hand-written BPTT) must be the same neuron, or
    their timings compare nothing."""
    from kdengine.bench.spiking import ALPHA, THRESHOLD, torch_if_loop, torch_if_loop_autograd

    x = _x((16, 300))
    gs = torch.randn(16, 300)
    ref_s, _, ref_g, _ = _run("reference", x, gs, thr=THRESHOLD, surrogate="atan", alpha=ALPHA)
    assert torch.equal(torch_if_loop(x), ref_s)
    xl = x.clone().requires_grad_(True)
    s = torch_if_loop_autograd(xl)
    s.backward(gs)
    assert torch.equal(s.detach(), ref_s)
    torch.testing.assert_close(xl.grad, ref_g, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: if_multistep(torch.tensor(1.0)), ValueError, r"^x must have shape \(T, \.\.\.\)"),
        (lambda: if_multistep(torch.zeros(0, 3)), ValueError, r"^x must have T >= 1"),
        (lambda: if_multistep(torch.ones(3, 2, dtype=torch.int32)), TypeError, r"^x must be a floating"),
        (lambda: if_multistep(torch.ones(3, 2, dtype=torch.bool)), TypeError, r"^x must be a floating"),
        (lambda: if_multistep([1.0, 2.0]), TypeError, r"^x must be a torch.Tensor"),
        (lambda: if_multistep(torch.ones(3, 2), 0.0), ValueError, r"^v_threshold must be finite and > 0"),
        (lambda: if_multistep(torch.ones(3, 2), -1.0), ValueError, r"^v_threshold must be finite and > 0"),
        (lambda: if_multistep(torch.ones(3, 2), float("nan")), ValueError, r"^v_threshold"),
        (lambda: if_multistep(torch.ones(3, 2), float("inf")), ValueError, r"^v_threshold"),
        (lambda: if_multistep(torch.ones(3, 2), "1"), TypeError, r"^v_threshold must be a real"),
        (lambda: if_multistep(torch.ones(3, 2), 1.0, 1.0), ValueError, r"^v_reset must be below v_threshold"),
        (lambda: if_multistep(torch.ones(3, 2), 1.0, float("nan")), ValueError, r"^v_reset must be finite"),
        (lambda: if_multistep(torch.ones(3, 2), v_init=torch.zeros(3)), ValueError, r"^v_init must have the shape"),
        (lambda: if_multistep(torch.ones(3, 2), v_init=torch.zeros(2, dtype=torch.long)), TypeError,
         r"^v_init must be a floating"),
        (lambda: if_multistep(torch.ones(3, 2), surrogate="relu"), ValueError, r"^surrogate must be one of"),
        (lambda: if_multistep(torch.ones(3, 2), surrogate=None), TypeError, r"^surrogate must be a str"),
        (lambda: if_multistep(torch.ones(3, 2), alpha=0.0), ValueError, r"^alpha must be finite and > 0"),
        (lambda: if_multistep(torch.ones(3, 2), detach_reset=1), TypeError, r"^detach_reset must be a bool"),
        (lambda: if_multistep(torch.ones(3, 2), backend="gpu"), ValueError, r"backend"),
    ],
    ids=["0-dim", "T=0", "int", "bool", "list", "thr0", "thr<0", "thr-nan", "thr-inf", "thr-str",
         "reset>=thr", "reset-nan", "v_init-shape", "v_init-int", "surrogate", "surrogate-type",
         "alpha", "detach-type", "backend"],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_surrogate_names_and_default_alpha(seed):
    """'ATan'/'Sigmoid' (SpikingJelly's class names) are accepted; alpha defaults to 2 and 4."""
    x = _x((4, 6)).requires_grad_(True)
    for name, default in (("ATan", 2.0), ("Sigmoid", 4.0)):
        (g1,) = torch.autograd.grad(if_multistep(x, THR, surrogate=name, backend="reference").sum(), x)
        (g2,) = torch.autograd.grad(
            if_multistep(x, THR, surrogate=name.lower(), alpha=default, backend="reference").sum(), x)
        assert torch.equal(g1, g2)
    assert math.isfinite(float(g1.sum()))


@pytest.mark.skipif("cpu" not in [getattr(b, "values", (b,))[0] for b in BACKENDS], reason="no cpu backend here")
@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("v_reset", RESETS, ids=RESET_IDS)
@pytest.mark.parametrize("shape", [(3, 1), (5, 17), (2, 53), (4, 2048 + 13)], ids=str)
def test_cpu_paths_give_the_portable_bits(shape, v_reset, surrogate, cpu_float_path, seed):
    """Each instruction-set path of the C++ kernel (fp32: 4, 8 or 16 neurons per vector, scalar
    tails; N = 1, primes, past the 2048-neuron forward block) gives the portable build's spikes,
    potentials and gradients bit for bit, and the reference's spikes."""
    from kdengine import testing

    x = _x(shape)
    gs, gv = torch.randn(shape), torch.randn(shape[1:])
    v0 = torch.randn(shape[1:]) * 0.5
    kw = dict(surrogate=surrogate, v_reset=v_reset, alpha=2.5)
    forced = _run("cpu", x, gs, gv, v0, **kw)
    with testing.float_isa(testing.ISA_PORTABLE):
        portable = _run("cpu", x, gs, gv, v0, **kw)
    for a, b in zip(forced, portable):
        assert torch.equal(a, b), f"seed={seed}"
    rs, rv, rgx, _ = _run("reference", x, gs, gv, v0, **kw)
    assert torch.equal(forced[0], rs) and torch.equal(forced[1], rv)
    _close(forced[2], rgx, 1e-5, 1e-6, f"grad x, seed={seed}")
