"""kd_loss reliability: large finite temperatures, double backward, gradients as plain tensors.

Every test runs on every backend (tests/backend_params.py) with fresh random inputs.
"""
from __future__ import annotations

import math

import mpmath
import pytest
import torch

import kdengine
from kdengine.ops.kd_loss.reference import LARGE_T
from tests.backend_params import backend_params

BACKENDS = backend_params("kd_loss")
TEMPS = [1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, LARGE_T, math.nextafter(LARGE_T, 0.0),
         math.nextafter(LARGE_T, math.inf)]
DIVS = ["forward_kl", "reverse_kl", "jsd"]


# --------------------------------------------------------------------------- oracle (mpmath)


def _mp_row(s, t, T, div, beta):
    """D and dD/ds (including the 1/T of the chain rule) of one row, in 50-digit arithmetic."""
    a = [mpmath.mpf(x) / T for x in s]
    b = [mpmath.mpf(x) / T for x in t]
    la, lb = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in a)), mpmath.log(mpmath.fsum(mpmath.exp(x) for x in b))
    lq = [x - la for x in a]
    lp = [x - lb for x in b]
    q = [mpmath.exp(x) for x in lq]
    p = [mpmath.exp(x) for x in lp]
    if div == "forward_kl":
        D = mpmath.fsum(pi * (x - y) for pi, x, y in zip(p, lp, lq))
        g = [(qi - pi) / T for qi, pi in zip(q, p)]
    elif div == "reverse_kl":
        D = mpmath.fsum(qi * (y - x) for qi, x, y in zip(q, lp, lq))
        g = [qi * (y - x - D) / T for qi, x, y in zip(q, lp, lq)]
    else:
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        lm = [mpmath.log(x) for x in m]
        D = beta * mpmath.fsum(pi * (x - z) for pi, x, z in zip(p, lp, lm)) + (1 - beta) * mpmath.fsum(
            qi * (y - z) for qi, y, z in zip(q, lq, lm))
        # dD/da_j = (1 - beta) q_j ((log q_j - log m_j) - KL(q || m))
        klq = mpmath.fsum(qi * (y - z) for qi, y, z in zip(q, lq, lm))
        g = [(1 - beta) * qi * ((y - z) - klq) / T for qi, y, z in zip(q, lq, lm)]
    return D, g


def _mp_loss(s, t, T, div, beta=0.5, labels=None, alpha=0.0):
    """batchmean loss and its gradient w.r.t. the student, as float64 tensors."""
    mpmath.mp.dps = 50
    n, v = s.shape
    T = mpmath.mpf(T)
    k = (1 - mpmath.mpf(alpha)) * T * T
    total = mpmath.mpf(0)
    grad = torch.empty(n, v, dtype=torch.float64)
    for r in range(n):
        sr, tr = s[r].tolist(), t[r].tolist()
        D, g = _mp_row(sr, tr, T, div, beta)
        gr = [k * x for x in g]
        total += k * D
        if alpha > 0:
            lse = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(x)) for x in sr))
            y = int(labels[r])
            total += alpha * (lse - sr[y])
            for j in range(v):
                gr[j] += alpha * (mpmath.exp(mpmath.mpf(sr[j]) - lse) - (1 if j == y else 0))
        grad[r] = torch.tensor([float(x / n) for x in gr], dtype=torch.float64)
    return float(total / n), grad


def _rel(x, ref):
    return (x.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-300)


# --------------------------------------------------------------------------- item 2: large T


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", DIVS)
def test_large_temperature_accuracy(backend, div):
    n, v = 3, 40
    s = torch.randn(n, v).mul_(3)
    t = torch.randn(n, v).mul_(3)
    for T in TEMPS:
        a = s.clone().requires_grad_(True)
        loss = kdengine.kd_loss(a, t, T, divergence=div, backend=backend)
        loss.backward()
        ref, gref = _mp_loss(s.double(), t.double(), T, div)
        assert abs(loss.item() - ref) <= 1e-5 * abs(ref), (T, loss.item(), ref)
        assert _rel(a.grad, gref) <= 1e-5, (T, _rel(a.grad, gref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_temperature_with_hard_labels(backend):
    n, v = 3, 40
    s = torch.randn(n, v).mul_(3)
    t = torch.randn(n, v).mul_(3)
    y = torch.randint(0, v, (n,))
    for T in [2.0, LARGE_T, 1e3, 1e6, 1e8]:
        a = s.clone().requires_grad_(True)
        loss = kdengine.kd_loss(a, t, T, labels=y, hard_weight=0.5, backend=backend)
        loss.backward()
        ref, gref = _mp_loss(s.double(), t.double(), T, "forward_kl", labels=y, alpha=0.5)
        assert abs(loss.item() - ref) <= 1e-5 * abs(ref), (T, loss.item(), ref)
        assert _rel(a.grad, gref) <= 1e-5, T


def test_large_temperature_reference_float64_matches_limit():
    """Far above the threshold the float64 reference approaches the exact T = inf limit."""
    s, t = torch.randn(2, 4, 100, dtype=torch.float64)
    lim = kdengine.kd_loss(s, t, math.inf, backend="reference").item()
    val = kdengine.kd_loss(s, t, 1e8, backend="reference").item()
    assert abs(val - lim) <= 1e-6 * abs(lim)


@pytest.mark.parametrize("T", [1e-320, 5e-324, 1e200, 1e155])
def test_temperature_overflow_raises(T):
    s, t = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="temperature"):
        kdengine.kd_loss(s, t, T)


def test_huge_temperature_without_t2_is_allowed():
    s, t = torch.randn(2, 3, 10, dtype=torch.float64)
    out = kdengine.kd_loss(s, t, 1e200, scale_t2=False, backend="reference")
    assert torch.isfinite(out)


# --------------------------------------------------------------------------- item 3: double backward


def test_gradgradcheck_reference():
    s = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    for div in DIVS:
        def f(a, b, div=div):
            return kdengine.kd_loss(a, b, 2.0, divergence=div, backend="reference")

        assert torch.autograd.gradgradcheck(f, (s, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_right_or_raises(backend):
    a = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 11, dtype=torch.float64)
    try:
        g, = torch.autograd.grad(kdengine.kd_loss(a, t, 2.0, backend=backend), a, create_graph=True)
    except RuntimeError as e:
        assert "double backward" in str(e) and "reference" in str(e)
        return
    g.pow(2).sum().backward()
    a2 = a.detach().clone().requires_grad_(True)
    g2, = torch.autograd.grad(kdengine.kd_loss(a2, t, 2.0, backend="reference"), a2, create_graph=True)
    g2.pow(2).sum().backward()
    assert a.grad is not None
    torch.testing.assert_close(a.grad, a2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad(backend):
    a = torch.randn(3, 11, dtype=torch.float64)
    t = torch.randn(3, 11, dtype=torch.float64)
    f = lambda x: kdengine.kd_loss(x, t, 2.0, backend=backend)  # noqa: E731
    ref = lambda x: kdengine.kd_loss(x, t, 2.0, backend="reference")  # noqa: E731
    torch.testing.assert_close(torch.func.grad(f)(a), torch.func.grad(ref)(a))
    # second order through torch.func (hessian-vector product) as well
    v = torch.randn_like(a)
    hvp = torch.func.jvp(torch.func.grad(f), (a,), (v,))[1]
    hvp_ref = torch.func.jvp(torch.func.grad(ref), (a,), (v,))[1]
    torch.testing.assert_close(hvp, hvp_ref)


# --------------------------------------------------------------------------- item 5: gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_can_be_edited_in_place(backend):
    a = torch.randn(3, 19, requires_grad=True)
    t = torch.randn(3, 19)
    g, = torch.autograd.grad(kdengine.kd_loss(a, t, 2.0, backend=backend), a)
    g2 = g.clone()
    g.mul_(2.0)
    torch.testing.assert_close(g, 2.0 * g2)
    loss = kdengine.kd_loss(a, t, 2.0, backend=backend)
    loss.backward()
    a.grad.add_(1.0)  # a plain tensor, like any gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_between_retained_backward_passes(backend):
    a = torch.randn(3, 19, requires_grad=True)
    t = torch.randn(3, 19, requires_grad=True)
    loss = kdengine.kd_loss(a, t, 2.0, backend=backend)
    loss.backward(retain_graph=True)
    g1, gt1 = a.grad.clone(), t.grad.clone()
    a.grad.zero_()
    t.grad.zero_()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(a.grad, g1, rtol=0, atol=0)
    torch.testing.assert_close(t.grad, gt1, rtol=0, atol=0)
    loss.backward()  # accumulates: 2x
    torch.testing.assert_close(a.grad, 2 * g1)
    torch.testing.assert_close(t.grad, 2 * gt1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_temperature_shared_mask(backend):
    """Entries masked (-inf) in both inputs drop out at large T as they do at T = 1."""
    s = torch.randn(3, 40).mul_(3)
    t = torch.randn(3, 40).mul_(3)
    s[:, 5:9] = -math.inf
    t[:, 5:9] = -math.inf
    keep = torch.ones(40, dtype=torch.bool)
    keep[5:9] = False
    for T in [LARGE_T, 1e3, 1e8]:
        a = s.clone().requires_grad_(True)
        loss = kdengine.kd_loss(a, t, T, backend=backend)
        loss.backward()
        ref, gref = _mp_loss(s[:, keep].double(), t[:, keep].double(), T, "forward_kl")
        assert abs(loss.item() - ref) <= 1e-5 * abs(ref), (T, loss.item(), ref)
        assert torch.all(a.grad[:, ~keep] == 0)
        assert _rel(a.grad[:, keep], gref) <= 1e-5, T


@pytest.mark.parametrize("backend", backend_params("kd_loss", slow_interpreted=True))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("div", DIVS)
def test_half_precision_wide_logits_give_no_nan(backend, dtype, div):
    """bf16/fp16 logits with std 30 at T = 1: log-ratios of ~100 between student and teacher.
    The cpu kernel's p - q = -q expm1(log p - log q) overflowed there (inf times a q that
    rounds to 0: NaN gradients). Compared with the float64 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(1234)
    s = (torch.randn(64, 1000, generator=g, dtype=torch.float64) * 30).to(dtype)
    t = (torch.randn(64, 1000, generator=g, dtype=torch.float64) * 30).to(dtype)
    kw = dict(divergence=div)
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = kdengine.kd_loss(s1, t1, 1.0, backend=backend, **kw)
    loss.backward()
    s2, t2 = s.double().requires_grad_(), t.double().requires_grad_()
    ref = kdengine.kd_loss(s2, t2, 1.0, backend="reference", **kw)
    ref.backward()
    fi = torch.finfo(dtype)
    subnormal_step = fi.smallest_normal * fi.eps  # the gradient is returned in `dtype`
    for got, want in ((s1.grad, s2.grad), (t1.grad, t2.grad)):
        assert torch.isfinite(got).all()
        err = (got.double() - want).abs().max()
        assert err <= 1e-2 * want.abs().max() + subnormal_step, err
    assert abs(loss.double() - ref).item() <= 1e-2 * abs(ref).item()
