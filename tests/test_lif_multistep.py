"""lif_multistep: every backend against the reference step loop (the spec), with the same tests.

Forward: spikes and final potentials must be *identical* to the reference run in the same state
dtype (the kernels do the reference's operations in its order), and to the float64 reference
where fp32 is exact (inputs on a grid). Backward: against autograd of the reference (x, v_init,
tau / decay, threshold), and against finite differences (gradcheck in float64). Shapes stay tiny
so the Triton interpreter (CPU) can run every case. Fresh random inputs per run.
"""
from __future__ import annotations

import pytest
import torch

from kdengine import _dispatch
from kdengine.ops.if_multistep.reference import surrogate_primitive
from kdengine.ops.lif_multistep import lif_multistep
from kdengine.ops.lif_multistep.reference import charge
from tests.backend_params import backend_params

BACKENDS = backend_params("lif_multistep")
# the triton param of the many-case SpikingJelly / gradcheck tests runs with -m slow (interpreter)
HEAVY = backend_params("lif_multistep", slow_interpreted=True)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]
SHAPES = [(1, 1), (1, 7), (5, 1), (7, 3, 11), (16, 131)]  # T = 1, N = 1, primes, an extra dim
THR = 0.7  # not a power of two: fp32(0.7) != 0.7, so threshold rounding matters
# (v_reset, decay_input, leak kind and value): reset by subtraction / hard, both charge forms,
# tau (divide; 1.7 is inexact in binary) and the decay factor (multiply)
CONFIGS = [(None, True, "tau", 1.7), (-0.25, True, "decay", 0.37), (None, False, "decay", 0.6),
           (0.0, False, "tau", 3.0)]
CONFIG_IDS = ["soft-in-tau", "hard-in-decay", "soft-noin-decay", "hard0-noin-tau"]


def _x(shape, dtype=torch.float32, scale=0.8, bias=0.45):
    return (torch.randn(*shape, dtype=torch.float64) * scale + bias).to(dtype)


def _state(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kw(config, leak=None):
    v_reset, decay_input, kind, value = config
    return {kind: value if leak is None else leak, "v_reset": v_reset, "decay_input": decay_input}


def _run(backend, x, gs, gv=None, v_init=None, thr=THR, config=CONFIGS[0], learn=True, **kw):
    """Spikes, final v and the gradients of sum(gs * spikes) + sum(gv * v) w.r.t. x, v_init, the
    leak (tau or decay) and the threshold (both learnable tensors when ``learn``)."""
    sd = _state(x.dtype)
    x = x.detach().clone().requires_grad_(True)
    v0 = None if v_init is None else v_init.detach().clone().requires_grad_(True)
    leak = torch.tensor(config[3], dtype=sd, requires_grad=True) if learn else None
    th = torch.tensor(thr, dtype=sd, requires_grad=True) if learn else thr
    s, v = lif_multistep(x, v_threshold=th, v_init=v0, return_v=True, backend=backend,
                         **_kw(config, leak), **kw)
    loss = (s.to(gs.dtype) * gs).sum()
    if gv is not None:
        loss = loss + (v.to(gv.dtype) * gv).sum()
    loss.backward()
    grads = {"x": x.grad, "v_init": None if v0 is None else v0.grad,
             "leak": None if leak is None else leak.grad, "thr": th.grad if learn else None}
    return s.detach(), v.detach(), grads


def _close(actual, expected, rtol, atol, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=what)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_forward_equals_reference_exactly(backend, shape, dtype, config, seed):
    x = _x(shape, dtype)
    s, v = lif_multistep(x, v_threshold=THR, return_v=True, backend=backend, **_kw(config))
    rs, rv = lif_multistep(x, v_threshold=THR, return_v=True, backend="reference", **_kw(config))
    assert s.dtype == dtype and s.shape == x.shape and v.shape == x.shape[1:] and v.dtype == dtype
    assert torch.equal(s, rs), f"spikes differ, seed={seed}"
    assert torch.equal(v, rv), f"final potential differs, seed={seed}"
    if x.numel() > 100:
        assert 0 < int(s.sum()) < s.numel(), "inputs should make some neurons fire"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v_reset", [None, -0.25], ids=["soft", "hard"])
@pytest.mark.parametrize("decay_input", [True, False], ids=["in", "noin"])
def test_fp32_equals_float64_reference(backend, v_reset, decay_input, seed):
    """Inputs on a 1/64 grid, tau = 2, theta = 1: every potential is exact in fp32 over 8 steps,
    so the fp32 kernel and the float64 reference walk the same trajectory; gradients (x, v_init,
    tau, theta) then agree to fp32 rounding."""
    shape = (8, 37)
    x = torch.round(_x(shape, torch.float64) * 64) / 64
    v0 = torch.round(torch.randn(37, dtype=torch.float64) * 16) / 64
    gs = torch.randn(shape, dtype=torch.float64)
    gv = torch.randn(37, dtype=torch.float64)
    config = (v_reset, decay_input, "tau", 2.0)
    s, v, g = _run(backend, x.float(), gs.float(), gv.float(), v0.float(), thr=1.0, config=config)
    rs, rv, rg = _run("reference", x, gs, gv, v0, thr=1.0, config=config)
    assert torch.equal(s.double(), rs) and torch.equal(v.double(), rv)
    for k in ("x", "v_init", "leak", "thr"):
        torch.testing.assert_close(g[k].double(), rg[k], rtol=2e-5, atol=2e-5, msg=f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_checked_neuron(backend):
    # tau = 2, decay_input: h = v + (x - v) / 2. x = 1, 1, 1 from 0: h = 0.5, 0.75, 0.875 -> with
    # theta = 0.75 the second step fires (>=) and resets by subtraction to 0; the third h = 0.5.
    x = torch.tensor([[1.0], [1.0], [1.0]])
    s, v = lif_multistep(x, 2.0, 0.75, return_v=True, backend=backend)
    assert s.flatten().tolist() == [0.0, 1.0, 0.0] and v.item() == 0.5
    # the hard reset rests at v_reset: no input, no spike, v stays there
    s, v = lif_multistep(torch.zeros(3, 4), 2.0, 1.0, -0.5, return_v=True, backend=backend)
    assert bool((s == 0).all()) and bool((v == -0.5).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_extreme_inputs(backend, config, seed):
    """Huge, tiny, infinite and NaN currents: the same spikes and potentials as the reference
    (NaN in -> NaN out in that neuron, the others untouched)."""
    x = _x((6, 9))
    x[:, 0] = 3e38
    x[:, 1] = -3e38
    x[1, 2] = float("inf")
    x[2, 3] = float("-inf")
    x[:, 4] = 1e-40  # subnormal
    x[3, 5] = float("nan")
    s, v = lif_multistep(x, v_threshold=THR, return_v=True, backend=backend, **_kw(config))
    rs, rv = lif_multistep(x, v_threshold=THR, return_v=True, backend="reference", **_kw(config))
    torch.testing.assert_close(s, rs, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v, rv, equal_nan=True, rtol=0, atol=0)
    assert bool(torch.isnan(s[3:, 5]).all()) and bool(torch.isnan(v[5]))
    keep = [4, 6, 7, 8]  # (huge and infinite currents may overflow the state to inf - inf = NaN)
    assert bool(torch.isfinite(s[:, keep]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, seed):
    x = _x((6, 9, 5)).transpose(1, 2)
    assert torch.equal(lif_multistep(x, 1.7, THR, backend=backend),
                       lif_multistep(x.contiguous(), 1.7, THR, backend="reference"))


CPU_ISAS = ["portable", "avx2", "avx512"]
ISA_IDS = {"portable": 0, "avx2": 2, "avx512": 3}   # the float family's levels (kdengine.testing)
# tau = 2 takes the forward's exact multiply by 1/tau, tau = 1.7 the division, decay the multiply
ISA_CONFIGS = [(-0.25, True, "decay", 0.37), (None, True, "tau", 2.0), (0.0, False, "tau", 1.7)]


@pytest.fixture
def _force_isa(monkeypatch):
    """``force(isa)`` runs the CPU kernel's ``isa`` build for the rest of the test (the float
    family's knob, shared with the KD and IF kernels; skips where this CPU lacks it)."""
    if not _dispatch.op_availability("lif_multistep", "cpu", "cpu").available:
        pytest.skip("the cpu backend is not available here")
    from kdengine import testing

    monkeypatch.delenv("KDENGINE_CPU_PORTABLE", raising=False)
    old = []

    def force(isa: str) -> None:
        if ISA_IDS[isa] not in testing.float_isas():
            pytest.skip(f"this CPU lacks {isa}")
        old.append(testing.set_float_isa(ISA_IDS[isa]))
        assert testing.isa_in_use("float")[0] == ISA_IDS[isa]

    yield force
    for prev in reversed(old):
        testing.set_float_isa(prev)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("config", ISA_CONFIGS, ids=["hard-in-decay", "soft-in-tau2", "hard0-noin-tau"])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
def test_every_cpu_build_matches_reference(isa, config, surrogate, seed, _force_isa):
    """Each build the CPU has (forced): spikes and potentials identical to the reference, gradients
    (x, v_init, leak, threshold) close to its autograd. N = 2 * 64 + 37: whole and partial
    vectors (8 / 16 lanes) and gradient groups (64 neurons)."""
    _force_isa(isa)
    x = _x((9, 165))
    v0 = torch.randn(165) * 0.5
    gs, gv = torch.randn(x.shape), torch.randn(165)
    kw = dict(config=config, surrogate=surrogate, alpha=3.0)
    s, v, g = _run("cpu", x, gs, gv, v0, **kw)
    rs, rv, rg = _run("reference", x, gs, gv, v0, **kw)
    assert torch.equal(s, rs) and torch.equal(v, rv)
    for k in ("x", "v_init", "leak", "thr"):
        _close(g[k], rg[k], 2e-5, 2e-5, f"grad {k} ({isa}), seed={seed}")


def test_cpu_gradients_do_not_depend_on_thread_count(seed):
    """The tau / threshold gradients are summed in fixed groups of neurons: 1 and 2 threads give
    the same bits (N large enough for the kernel to split it; on one thread it walks several
    blocks of neurons), and both match the reference."""
    if not _dispatch.op_availability("lif_multistep", "cpu", "cpu").available:
        pytest.skip("the cpu backend is not available here")
    x = _x((16, 5003))
    gs = torch.randn(x.shape)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(_run("cpu", x, gs, config=CONFIGS[1], surrogate="sigmoid"))
    finally:
        torch.set_num_threads(threads)
    (s0, v0, g0), (s1, v1, g1) = out
    rs, rv, rg = _run("reference", x, gs, config=CONFIGS[1], surrogate="sigmoid")
    assert torch.equal(s0, s1) and torch.equal(v0, v1) and torch.equal(s0, rs) and torch.equal(v0, rv)
    for k in ("x", "leak", "thr"):
        assert torch.equal(g0[k], g1[k]), k
        _close(g0[k], rg[k], 2e-5, 2e-5, f"grad {k}, seed={seed}")


# --------------------------------------------------------------------------- backward


@pytest.mark.parametrize("backend", HEAVY)
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_backward_matches_autograd_of_reference(backend, surrogate, config, detach_reset, dtype,
                                                seed):
    shape = (7, 3, 11)
    x = _x(shape, dtype)
    sd = _state(dtype)
    v0 = (torch.randn(shape[1:], dtype=torch.float64) * 0.5).to(sd)
    gs = torch.randn(shape, dtype=torch.float64).to(dtype)
    gv = torch.randn(shape[1:], dtype=torch.float64).to(sd)
    kw = dict(surrogate=surrogate, detach_reset=detach_reset, alpha=3.0, config=config)
    s, v, g = _run(backend, x, gs, gv, v0, **kw)
    rs, rv, rg = _run("reference", x, gs, gv, v0, **kw)
    assert torch.equal(s, rs) and torch.equal(v, rv)
    rtol, atol = (2e-5, 2e-5) if dtype == torch.float32 else (1e-11, 1e-11)
    for k in ("x", "v_init", "leak", "thr"):
        _close(g[k], rg[k], rtol, atol, f"grad {k}, seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_only_final_potential_used_and_constant_params(backend, config, seed):
    """Backward with no gradient reaching the spikes, and with float (not learnable) params."""
    x = _x((6, 17)).requires_grad_(True)
    _, v = lif_multistep(x, v_threshold=THR, return_v=True, backend=backend, **_kw(config))
    (g,) = torch.autograd.grad(v.sum(), x)
    xr = x.detach().clone().requires_grad_(True)
    _, vr = lif_multistep(xr, v_threshold=THR, return_v=True, backend="reference", **_kw(config))
    (gr,) = torch.autograd.grad(vr.sum(), xr)
    _close(g, gr, 1e-5, 1e-6, f"seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_input(backend, dtype, seed):
    """bf16/fp16 x: the state is fp32, so the trajectory equals the fp32 run on x.float(); the
    x gradient is formed in fp32 and rounded once (within one ulp); parameter gradients are fp32."""
    shape = (9, 3, 7)
    x = _x(shape, dtype)
    gs = torch.randn(shape, dtype=torch.float64).to(dtype)
    config = CONFIGS[1]
    s, v, g = _run(backend, x, gs, config=config, surrogate="sigmoid")
    s32, v32, g32 = _run("reference", x.float(), gs.float(), config=config, surrogate="sigmoid")
    assert s.dtype == dtype and g["x"].dtype == dtype
    assert torch.equal(s.float(), s32)
    fi = torch.finfo(dtype)
    err = (g["x"].float() - g32["x"]).abs()
    assert bool((err <= fi.eps * g32["x"].abs() + fi.tiny).all()), f"max err {float(err.max())}"
    for k in ("leak", "thr"):
        torch.testing.assert_close(g[k], g32[k], rtol=1e-4, atol=1e-4)


def _trajectory(x, v0, leak, thr, v_reset, decay_input, divide):
    """Hard spikes and pre-reset potentials h of the float64 step loop (T, N)."""
    r = 0.0 if v_reset is None else v_reset
    v, hs, ss = v0.clone(), [], []
    for t in range(x.shape[0]):
        h = charge(v, x[t], leak, r, decay_input, divide)
        s = (h >= thr).double()
        hs.append(h)
        ss.append(s)
        v = torch.where(s == 1, (h - thr) if v_reset is None else torch.full_like(h, r), h)
    return torch.stack(ss), torch.stack(hs)


@pytest.mark.parametrize("backend", HEAVY)
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
def test_gradcheck_surrogate_model(backend, surrogate, config, detach_reset, seed):
    """gradcheck where it means something (the spikes are a step function: finite differences
    never see the surrogate). A Function whose forward is a smooth model equal to the hard forward
    at the base point (spike_t = s0_t + p(u_t) - p(u0_t), p' = the surrogate derivative) and whose
    backward is the kernel's: gradcheck then checks the fused backward -- including the tau /
    decay and threshold gradients -- against calculus, independently of autograd of the reference."""
    v_reset, decay_input, kind, leak0 = config
    divide = kind == "tau"
    alpha = 1.7
    T, N = 5, 4
    x0 = _x((T, N), torch.float64)
    v00 = torch.randn(N, dtype=torch.float64) * 0.3
    s0, h0 = _trajectory(x0, v00, leak0, THR, v_reset, decay_input, divide)
    r = 0.0 if v_reset is None else v_reset

    def model(x, v, leak, thr):
        out = []
        for t in range(T):
            h = charge(v, x[t], leak, r, decay_input, divide)
            u, u0 = h - thr, h0[t] - THR
            s = s0[t] + (surrogate_primitive(u, surrogate, alpha) - surrogate_primitive(u0, surrogate, alpha))
            s_r = s0[t] if detach_reset else s
            v = h - s_r * thr if v_reset is None else s_r * r + (1 - s_r) * h
            out.append(s)
        return torch.stack(out), v

    class KernelVJP(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, v_init, leak, thr):
            ctx.save_for_backward(x, v_init, leak, thr)
            return model(x, v_init, leak, thr)

        @staticmethod
        def backward(ctx, gs, gv):
            x, v_init, leak, thr = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
            with torch.enable_grad():
                s, v = lif_multistep(x, v_threshold=thr, v_init=v_init, return_v=True,
                                     backend=backend, surrogate=surrogate, alpha=alpha,
                                     detach_reset=detach_reset, **_kw(config, leak))
                gs = torch.zeros_like(s) if gs is None else gs
                gv = torch.zeros_like(v) if gv is None else gv
                return torch.autograd.grad((s, v), (x, v_init, leak, thr), (gs, gv))

    inputs = (x0.clone().requires_grad_(True), v00.clone().requires_grad_(True),
              torch.tensor(leak0, dtype=torch.float64, requires_grad=True),
              torch.tensor(THR, dtype=torch.float64, requires_grad=True))
    assert torch.equal(KernelVJP.apply(*inputs)[0], s0)  # the model is the forward at the base point
    assert torch.autograd.gradcheck(KernelVJP.apply, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_gradcheck_potential_path_detached(backend, config, seed):
    """With detach_reset and only the final potential as output the op is piecewise smooth and its
    backward is the true derivative: plain gradcheck of lif_multistep in x, v_init, tau / decay and
    the threshold, away from threshold crossings."""
    v_reset, decay_input, kind, leak0 = config
    x = _x((6, 5), torch.float64)
    v0 = torch.randn(5, dtype=torch.float64) * 0.3
    for _ in range(200):  # keep every potential at least 1e-3 away from the threshold
        _, h = _trajectory(x, v0, leak0, THR, v_reset, decay_input, kind == "tau")
        if bool(((h - THR).abs() > 1e-3).all()):
            break
        x = _x((6, 5), torch.float64)

    def fn(a, b, leak, thr):
        return lif_multistep(a, v_threshold=thr, v_init=b, return_v=True, detach_reset=True,
                             backend=backend, **_kw(config, leak))[1]

    inputs = (x.requires_grad_(True), v0.requires_grad_(True),
              torch.tensor(leak0, dtype=torch.float64, requires_grad=True),
              torch.tensor(THR, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_chunked_stream_equals_one_long_run(backend, config, seed):
    x = _x((11, 2, 9))
    gs = torch.randn(x.shape)
    s_all, v_all, g_all = _run(backend, x, gs, config=config, learn=False, surrogate="sigmoid")
    xl = x.detach().clone().requires_grad_(True)
    v, chunks = None, []
    for lo, hi in ((0, 4), (4, 5), (5, 11)):  # chunk lengths 4, 1, 6
        s, v = lif_multistep(xl[lo:hi], v_threshold=THR, v_init=v, return_v=True, backend=backend,
                             surrogate="sigmoid", **_kw(config))
        chunks.append(s)
    s_chunks = torch.cat(chunks)
    (s_chunks * gs).sum().backward()
    assert torch.equal(s_chunks.detach(), s_all) and torch.equal(v.detach(), v_all)
    _close(xl.grad, g_all["x"], 1e-5, 1e-6, f"gradient through the chunk boundary, seed={seed}")


# --------------------------------------------------------------------------- SpikingJelly


def _sj_surrogate(name, alpha):
    sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    return {"atan": sj_surrogate.ATan, "sigmoid": sj_surrogate.Sigmoid}[name](alpha=alpha)


@pytest.mark.parametrize("backend", HEAVY)
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize("v_reset", [None, 0.0, -0.25], ids=["soft", "hard0", "hard"])
@pytest.mark.parametrize("decay_input", [True, False], ids=["in", "noin"])
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
def test_equals_spikingjelly_lifnode(backend, surrogate, v_reset, decay_input, detach_reset, seed):
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    fn = _sj_surrogate(surrogate, 2.5)
    tau = 3.0  # 1/3 is inexact: the division must be a division, as SpikingJelly's
    node = sj_neuron.LIFNode(tau=tau, decay_input=decay_input, v_threshold=THR, v_reset=v_reset,
                             surrogate_function=fn, detach_reset=detach_reset, step_mode="m")
    x = _x((8, 3, 13))
    gs = torch.randn(x.shape)
    xs = x.clone().requires_grad_(True)
    s_sj = node(xs)
    (s_sj * gs).sum().backward()
    s, v, g = _run(backend, x, gs, config=(v_reset, decay_input, "tau", tau), learn=False,
                   surrogate=surrogate, alpha=2.5, detach_reset=detach_reset)
    assert torch.equal(s, s_sj.detach()), f"spikes differ from SpikingJelly, seed={seed}"
    assert torch.equal(v, node.v.detach())
    _close(g["x"], xs.grad, 1e-5, 1e-6, f"gradient vs SpikingJelly, seed={seed}")


@pytest.mark.parametrize("backend", HEAVY)
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize("v_reset", [None, 0.0], ids=["soft", "hard0"])
@pytest.mark.parametrize("decay_input", [True, False], ids=["in", "noin"])
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
def test_equals_spikingjelly_parametric_lifnode(backend, surrogate, v_reset, decay_input,
                                                detach_reset, seed):
    """kdengine's ParametricLIFNeuron and SpikingJelly's ParametricLIFNode: same spikes, same final
    potential, the same gradients w.r.t. x and w (the learned 1/tau = sigmoid(w))."""
    sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    from kdengine.snn import ParametricLIFNeuron

    kw = dict(v_threshold=THR, v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset)
    node = sj_neuron.ParametricLIFNode(init_tau=2.7, surrogate_function=_sj_surrogate(surrogate, 2.5),
                                       step_mode="m", **kw)
    ours = ParametricLIFNeuron(2.7, surrogate=surrogate, alpha=2.5, backend=backend, **kw)
    assert torch.equal(ours.w.detach(), node.w.detach())
    x = _x((8, 3, 13))
    gs = torch.randn(x.shape)
    xs, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    s_sj, s = node(xs), ours(xo)
    (s_sj * gs).sum().backward()
    (s * gs).sum().backward()
    assert torch.equal(s.detach(), s_sj.detach()), f"spikes differ from SpikingJelly, seed={seed}"
    assert torch.equal(ours.v.detach(), node.v.detach())
    _close(xo.grad, xs.grad, 1e-5, 1e-6, f"grad x vs SpikingJelly, seed={seed}")
    _close(ours.w.grad, node.w.grad, 1e-4, 1e-5, f"grad w vs SpikingJelly, seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_equals_spikingjelly_lifnode(backend, seed):
    """SpikingJelly's LIFNode module keeps a bf16 state for bf16 input; its functional form with an
    fp32 state is what kdengine computes."""
    sj_functional = pytest.importorskip("spikingjelly.activation_based.functional")
    x = _x((8, 40), torch.bfloat16)
    s_sj, v_sj, _ = sj_functional.lif_multi_step(x, torch.zeros(40), 2.0, True, THR, None,
                                                 _sj_surrogate("sigmoid", 4.0), False)
    s, v = lif_multistep(x, 2.0, THR, return_v=True, backend=backend)
    assert torch.equal(s, s_sj) and torch.equal(v, v_sj.to(torch.bfloat16))


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("backend", BACKENDS)
def test_lif_neuron_module_carries_state(backend, seed):
    from kdengine.snn import LIFNeuron, reset_states

    x = _x((10, 2, 3, 5))
    m = LIFNeuron(1.7, THR, -0.1, backend=backend)
    whole = m(x)
    reset_states(m)
    parts = torch.cat([m(x[:3]), m(x[3:])])
    assert torch.equal(whole, parts)
    assert torch.equal(whole, lif_multistep(x, 1.7, THR, -0.1, backend="reference"))
    assert "tau=1.7" in repr(m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parametric_lif_learns_tau_and_threshold(backend, seed):
    """Gradients reach w and the threshold parameter, and equal the reference backend's."""
    from kdengine.snn import ParametricLIFNeuron

    x = _x((6, 4, 9))
    gs = torch.randn(x.shape)
    grads = []
    for b in (backend, "reference"):
        m = ParametricLIFNeuron(2.0, THR, learn_threshold=True, backend=b, surrogate="sigmoid")
        (m(x) * gs).sum().backward()
        grads.append((m.w.grad, m.threshold.grad))
    (w, th), (wr, thr) = grads
    assert w is not None and th is not None and float(w.abs()) > 0 and float(th.abs()) > 0
    torch.testing.assert_close(w, wr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(th, thr, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- compile, dispatch


def test_auto_backend_on_cpu_is_the_native_one_when_it_builds():
    avail = _dispatch.op_availability("lif_multistep", "cpu", "cpu")
    expected = "cpu" if avail.available else "reference"
    assert _dispatch.resolve("lif_multistep", torch.device("cpu"), "auto") == expected
    assert "lif_multistep" in _dispatch.backends()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("cpu", "reference")])
def test_torch_compile(backend, seed):
    x = _x((5, 3, 7)).requires_grad_(True)
    w = torch.tensor(0.3, requires_grad=True)

    def f(a, w):
        s, v = lif_multistep(a, v_threshold=THR, v_reset=-0.1, decay=torch.sigmoid(w),
                             return_v=True, backend=backend, surrogate="sigmoid")
        return (s * torch.arange(7.0)).sum() + v.square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, w)
    g = torch.autograd.grad(out, (x, w))
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = f(xr, wr)
    gr = torch.autograd.grad(ref, (xr, wr))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id == "cpu"])
def test_double_backward_raises_clearly(backend):
    x = _x((4, 5)).requires_grad_(True)
    (g,) = torch.autograd.grad(lif_multistep(x, backend=backend).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def _check_bench_loops(loops, seed):
    from kdengine.bench import spiking_lif as bench

    x = _x((16, 300))
    gs = torch.randn(16, 300)
    for plif in (False, True):
        w = torch.tensor(bench.PLIF_W, requires_grad=plif)
        kw = dict(v_threshold=bench.THRESHOLD, v_reset=bench.LIF_RESET, surrogate="sigmoid",
                  alpha=bench.LIF_ALPHA)
        kw.update(decay=torch.sigmoid(w)) if plif else kw.update(tau=bench.LIF_TAU)
        xr = x.clone().requires_grad_(True)
        ref = lif_multistep(xr, backend="reference", **kw)
        ref.backward(gs)
        for loop in loops:
            xl = x.clone().requires_grad_(True)
            wl = w.detach().clone().requires_grad_(True) if plif else None
            s = loop(xl, wl)
            s.backward(gs)
            assert torch.equal(s.detach(), ref.detach()), f"{loop.__name__}, seed={seed}"
            torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-5, atol=1e-6)
            if plif:
                torch.testing.assert_close(wl.grad, w.grad, rtol=1e-4, atol=1e-4)


def test_bench_baselines_compute_the_same_thing(seed):
    """The benchmark's torch loops must be the same neurons, or their timings compare nothing."""
    from kdengine.bench import spiking_lif as bench

    _check_bench_loops((bench.torch_lif_loop, bench.torch_lif_functional), seed)


@pytest.mark.slow
def test_bench_compiled_baseline_computes_the_same_thing(seed):
    from kdengine.bench import spiking_lif as bench

    _check_bench_loops((bench.torch_lif_loop_compiled,), seed)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: lif_multistep(torch.tensor(1.0)), ValueError, r"^x must have shape \(T, \.\.\.\)"),
        (lambda: lif_multistep(torch.zeros(0, 3)), ValueError, r"^x must have T >= 1"),
        (lambda: lif_multistep(torch.ones(3, 2, dtype=torch.int32)), TypeError, r"^x must be a floating"),
        (lambda: lif_multistep(torch.ones(3, 2), 0.5), ValueError, r"^tau must be finite and >= 1"),
        (lambda: lif_multistep(torch.ones(3, 2), float("inf")), ValueError, r"^tau must be"),
        (lambda: lif_multistep(torch.ones(3, 2), "2"), TypeError, r"^tau must be a real"),
        (lambda: lif_multistep(torch.ones(3, 2), decay=0.0), ValueError, r"^decay must be in \(0, 1\]"),
        (lambda: lif_multistep(torch.ones(3, 2), decay=1.5), ValueError, r"^decay must be in"),
        (lambda: lif_multistep(torch.ones(3, 2), 2.0, decay=0.5), ValueError, r"either tau or decay"),
        (lambda: lif_multistep(torch.ones(3, 2), torch.ones(2)), ValueError, r"^tau must be a float or a one"),
        (lambda: lif_multistep(torch.ones(3, 2), torch.tensor(2)), TypeError, r"^tau must be a float or a floating"),
        (lambda: lif_multistep(torch.ones(3, 2), 2.0, 0.0), ValueError, r"^v_threshold must be finite and > 0"),
        (lambda: lif_multistep(torch.ones(3, 2), 2.0, 1.0, 1.0), ValueError, r"^v_reset must be below"),
        (lambda: lif_multistep(torch.ones(3, 2), 2.0, torch.tensor(1.0), float("nan")), ValueError,
         r"^v_reset must be finite"),
        (lambda: lif_multistep(torch.ones(3, 2), v_init=torch.zeros(3)), ValueError, r"^v_init must have the shape"),
        (lambda: lif_multistep(torch.ones(3, 2), surrogate="relu"), ValueError, r"^surrogate must be one of"),
        (lambda: lif_multistep(torch.ones(3, 2), alpha=-1.0), ValueError, r"^alpha must be finite and > 0"),
        (lambda: lif_multistep(torch.ones(3, 2), decay_input=1), TypeError, r"^decay_input must be a bool"),
        (lambda: lif_multistep(torch.ones(3, 2), backend="gpu"), ValueError, r"backend"),
    ],
    ids=["0-dim", "T=0", "int", "tau<1", "tau-inf", "tau-str", "decay0", "decay>1", "both", "tau-vector",
         "tau-int-tensor", "thr0", "reset>=thr", "reset-nan", "v_init-shape", "surrogate", "alpha",
         "decay_input-type", "backend"],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_modules_validate():
    from kdengine.snn import LIFNeuron, ParametricLIFNeuron

    with pytest.raises(ValueError, match="tau must be"):
        LIFNeuron(0.5)
    with pytest.raises(ValueError, match="init_tau must be"):
        ParametricLIFNeuron(1.0)
