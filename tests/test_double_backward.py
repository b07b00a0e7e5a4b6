"""Second-order gradients are never silently wrong: each op either supports double backward
(``create_graph=True``; checked against the float64 reference and with gradgradcheck) or raises
a clear error; ``torch.func.grad`` works or raises.

Binary / spiking part: ``if_multistep``, the packed binary ops (inference-only: no gradient at
all) and the straight-through sign of :mod:`kdengine.nn.binary`.
"""
from __future__ import annotations

import pytest
import torch

from kdengine import _dispatch
from kdengine.nn.binary import BinaryConv2d, BinaryLinear, sign_ste
from kdengine.ops.binary import binary_conv2d, binary_linear, pack_signs, pack_spikes, spike_matmul, xnor_matmul
from kdengine.ops.if_multistep import if_multistep
from tests.backend_params import backend_params

IF_BACKENDS = backend_params("if_multistep")
THR = 0.7


def _saves_h(backend: str) -> bool:
    return _dispatch.implementation("if_multistep", backend).saves_h


def _x(shape, dtype=torch.float64):
    return (torch.randn(*shape, dtype=torch.float64) * 0.8 + 0.25).to(dtype)


# --------------------------------------------------------------------------- if_multistep


def _second_order(backend, x0, v00, gs, gv, reset, surrogate, detach_reset):
    """Gradient penalty ``|d L / d(x, v0)|^2`` with ``L = <gs, s> + <gv, v>`` backpropagated to x,
    v_init and a parameter ``w`` that scales gs (so the incoming gradient has a graph too), plus a
    Hessian-vector product of L."""
    x = x0.clone().requires_grad_(True)
    v0 = v00.clone().requires_grad_(True)
    w = torch.ones((), dtype=x.dtype, requires_grad=True)
    s, v = if_multistep(x * 1.0, THR, reset, v_init=v0, return_v=True, backend=backend,
                        surrogate=surrogate, detach_reset=detach_reset)
    loss = (s * gs * w).sum() + (v * gv).sum()
    gx, g0 = torch.autograd.grad(loss, (x, v0), create_graph=True)
    penalty = (gx * gx).sum() + (g0 * g0 * 0.5).sum() + (gx * x).sum()
    penalty.backward(retain_graph=True)
    # HVP of the loss along a random direction (the Hessian term an HVP must not drop)
    vec = torch.randn_like(x0)
    (hvp,) = torch.autograd.grad((gx * vec).sum(), x, retain_graph=True)
    return x.grad, v0.grad, w.grad, hvp


@pytest.mark.parametrize("backend", IF_BACKENDS)
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize("reset", [None, -0.25], ids=["soft", "hard"])
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
def test_if_multistep_double_backward_matches_reference(backend, surrogate, reset, detach_reset,
                                                        seed):
    T, N = 6, 9
    x0, v00 = _x((T, N)), torch.randn(N, dtype=torch.float64) * 0.3
    gs, gv = torch.randn(T, N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    if backend != "reference" and _saves_h(backend):
        want = rf"if_multistep: double backward .* not supported by the {backend} backend"
        with pytest.raises(RuntimeError, match=want):
            _second_order(backend, x0, v00, gs, gv, reset, surrogate, detach_reset)
        return
    torch.manual_seed(seed)
    got = _second_order(backend, x0, v00, gs, gv, reset, surrogate, detach_reset)
    torch.manual_seed(seed)
    exp = _second_order("reference", x0, v00, gs, gv, reset, surrogate, detach_reset)
    for name, a, b in zip(("x.grad", "v_init.grad", "w.grad", "hvp"), got, exp):
        assert a is not None, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert float(got[3].abs().sum()) > 0  # the Hessian term is really there


def _away_from_threshold(T, N, v00, reset):
    """x whose potentials stay >= 1e-3 away from the threshold (finite differences of the
    backward then see no spike flip)."""

    for _ in range(200):
        x = _x((T, N))
        h = []
        v = v00.clone()
        for t in range(T):
            ht = v + x[t]
            h.append(ht)
            s = (ht >= THR).double()
            v = ht - s * THR if reset is None else torch.where(s == 1, torch.full_like(ht, reset), ht)
        if bool((torch.stack(h) - THR).abs().gt(1e-3).all()):
            return x
    pytest.skip("no input away from the threshold found")  # pragma: no cover


@pytest.mark.parametrize("backend", [b for b in IF_BACKENDS if b.id in ("reference", "cpu")])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize("reset", [None, -0.25], ids=["soft", "hard"])
def test_if_multistep_gradgradcheck(backend, surrogate, reset, seed):
    """gradgradcheck in float64. With detach_reset the forward is piecewise linear in (x, v_init)
    with the spikes fixed, so away from threshold crossings finite differences of the backward
    (the surrogate formula evaluated on the potentials) are its true derivative."""
    T, N = 4, 5
    v00 = torch.randn(N, dtype=torch.float64) * 0.3
    x = _away_from_threshold(T, N, v00, reset).requires_grad_(True)
    v0 = v00.clone().requires_grad_(True)

    def fn(a, b):
        return if_multistep(a, THR, reset, v_init=b, return_v=True, backend=backend,
                            surrogate=surrogate, alpha=1.3, detach_reset=True)

    assert torch.autograd.gradgradcheck(fn, (x, v0), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", IF_BACKENDS)
@pytest.mark.parametrize("reset", [None, -0.25], ids=["soft", "hard"])
def test_if_multistep_torch_func_grad(backend, reset, seed):
    """torch.func.grad (and its second order, via jacrev of grad) equals plain autograd."""
    x0 = _x((5, 6))
    gs = torch.randn(5, 6, dtype=torch.float64)

    def f(a):
        return (if_multistep(a, THR, reset, backend=backend) * gs).sum()

    g = torch.func.grad(f)(x0)
    x = x0.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad((if_multistep(x, THR, reset, backend=backend) * gs).sum(), x)
    torch.testing.assert_close(g, ge, rtol=1e-12, atol=1e-12)
    h = torch.func.jacrev(torch.func.grad(lambda a: (f(a) ** 2)))(x0)
    xr = x0.clone().requires_grad_(True)
    he = torch.autograd.functional.hessian(
        lambda a: (if_multistep(a, THR, reset, backend="reference") * gs).sum() ** 2, xr)
    torch.testing.assert_close(h, he, rtol=1e-9, atol=1e-10)
    xs = torch.randn(3, 5, 6, dtype=torch.float64)  # vmap too
    torch.testing.assert_close(torch.vmap(lambda a: if_multistep(a, THR, reset, backend=backend))(xs),
                               torch.stack([if_multistep(a, THR, reset, backend=backend) for a in xs]))


@pytest.mark.parametrize("backend", [b for b in IF_BACKENDS if b.id in ("cpu", "reference")])
def test_if_multistep_torch_compile_still_first_order(backend, seed):
    """The double-backward formula of the backward op does not get in the way of compiling the
    first-order training step."""
    x = _x((5, 3, 7), torch.float32).requires_grad_(True)

    def f(a):
        s, v = if_multistep(a, THR, -0.1, return_v=True, backend=backend)
        return (s * torch.arange(7.0)).sum() + v.square().sum()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    (g,) = torch.autograd.grad(out, x)
    xr = x.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(f(xr), xr)
    torch.testing.assert_close(g, gr)


# --------------------------------------------------------------------------- binary ops


def _binary_calls(backend):
    w = pack_signs(torch.randn(4, 2 * 3 * 3))
    wl = pack_signs(torch.randn(5, 7))
    return {
        "binary_linear": lambda t: binary_linear(t.reshape(-1, 7), wl, backend=backend),
        "binary_conv2d": lambda t: binary_conv2d(t.reshape(1, 2, 7, 3), w, 3, padding=1, backend=backend),
    }


@pytest.mark.parametrize("backend", backend_params("binary_linear"))
@pytest.mark.parametrize("op", ["binary_linear", "binary_conv2d"])
def test_binary_ops_have_no_silent_gradient(backend, op, seed):
    """The packed ops are inference-only: under autograd the output does not require grad (so a
    backward, create_graph or not, raises); under torch.func.grad, which would otherwise
    return zeros, they raise a RuntimeError that says so."""
    call = _binary_calls(backend)[op]
    x = torch.randn(42, dtype=torch.float64, requires_grad=True)
    y = call(x)
    assert not y.requires_grad and y.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"{op} is inference-only and defines no gradient"):
        torch.func.grad(lambda t: call(t).sum())(x.detach())


@pytest.mark.parametrize("backend", backend_params("xnor_matmul"))
def test_packing_has_no_silent_gradient(backend, seed):
    with pytest.raises(RuntimeError, match="pack_signs is inference-only"):
        torch.func.grad(lambda t: xnor_matmul(pack_signs(t), pack_signs(t), backend=backend).double().sum())(
            torch.randn(3, 9, dtype=torch.float64))
    w = pack_signs(torch.randn(2, 9))
    with pytest.raises(RuntimeError, match="pack_spikes is inference-only"):
        torch.func.grad(lambda t: spike_matmul(pack_spikes(t), w, backend=backend).double().sum())(
            torch.ones(3, 9, dtype=torch.float64))


# --------------------------------------------------------------------------- STE layers


def test_sign_ste_gradgradcheck_and_func_grad(seed):
    """The clipped STE's backward is linear in grad_out with a piecewise-constant mask: double
    backward is exact (gradgradcheck away from |x| = 1); torch.func.grad equals autograd."""
    x = torch.randn(6, 5, dtype=torch.float64)
    x = torch.where((x.abs() - 1).abs() < 1e-3, x + 0.01, x).requires_grad_(True)
    assert torch.autograd.gradgradcheck(sign_ste, (x,), eps=1e-6, atol=1e-8)
    gs = torch.randn(6, 5, dtype=torch.float64)
    g = torch.func.grad(lambda t: (sign_ste(t) * gs * t).sum())(x.detach())
    (ge,) = torch.autograd.grad((sign_ste(x) * gs * x).sum(), x)
    torch.testing.assert_close(g, ge, rtol=0, atol=0)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_binary_layers_gradient_penalty(layer, seed):
    """A gradient penalty through the training-time binary layers: x.grad and the weight's grad
    exist and equal the same computation with the STE written out in plain torch ops."""
    torch.manual_seed(seed)
    if layer == "linear":
        m = BinaryLinear(8, 4, mode="both").double()
        x0 = torch.randn(3, 8, dtype=torch.float64) * 0.7
    else:
        m = BinaryConv2d(2, 3, 3, padding=1, mode="both").double()
        x0 = torch.randn(1, 2, 5, 5, dtype=torch.float64) * 0.7

    def ste(t):  # sign forward, clipped identity backward, in differentiable torch ops
        mask = (t.abs() <= 1).to(t.dtype)
        return (torch.where(t >= 0, 1.0, -1.0).to(t.dtype) - t * mask).detach() + t * mask

    def plain(a):
        from kdengine.nn.binary import channel_scale

        wb = ste(m.weight)
        if layer == "linear":
            y = torch.nn.functional.linear(ste(a), wb)
            return y * channel_scale(m.weight) + (0 if m.bias is None else m.bias)
        y = torch.nn.functional.conv2d(ste(a), wb, None, m.stride, m.padding, m.dilation)
        y = y * channel_scale(m.weight)[None, :, None, None]
        return y + (0 if m.bias is None else m.bias[None, :, None, None])

    results = []
    for f in (m, plain):
        m.zero_grad()
        x = x0.clone().requires_grad_(True)
        y = f(x)
        (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        ((gx * gx).sum() + (gx * x).sum()).backward()
        results.append((x.grad.clone(), m.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)
