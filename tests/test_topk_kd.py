"""Top-k sparse-teacher KD loss (kdengine.llm.topk) against its float64 reference and the dense loss."""
from __future__ import annotations

import math

import pytest
import torch

import kdengine
from kdengine.llm.topk import (
    TopKConfig,
    TopKKDLoss,
    make_topk_config,
    retemper_topk,
    topk_kd_loss,
    topk_kd_rows,
)
from kdengine.llm.reference_topk import topk_kd_rows_reference

COMBOS = [
    ("forward_kl", "renormalize"),
    ("forward_kl", "tail"),
    ("forward_kl", "uniform"),
    ("reverse_kl", "tail"),
    ("reverse_kl", "uniform"),
]


def _teacher(n, v, k, temperature, dtype=torch.float64, scale=3.0):
    t = torch.randn(n, v, dtype=torch.float64) * scale
    lp = torch.log_softmax(t / temperature, dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    return t, idx, vals.to(dtype)


def _both(s, idx, lp, temperature, **kw):
    """(loss, grad) of the implementation and of the reference, same upstream gradient."""
    s1 = s.detach().clone().requires_grad_()
    s2 = s.detach().clone().requires_grad_()
    a = topk_kd_loss(s1, idx, lp, temperature, **kw)
    b = topk_kd_loss(s2, idx, lp, temperature, backend="reference", **kw)
    g = torch.rand_like(a.detach()) + 0.5
    a.backward(g)
    b.backward(g.to(b.dtype))
    return a.detach(), s1.grad, b.detach(), s2.grad


@pytest.mark.parametrize("divergence,rule", COMBOS)
@pytest.mark.parametrize("n,v,k", [(1, 1, 1), (7, 13, 1), (7, 13, 5), (1, 37, 37), (7, 37, 8)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_float64_matches_reference(divergence, rule, n, v, k, temperature, seed):
    s = torch.randn(n, v, dtype=torch.float64) * 3
    _, idx, lp = _teacher(n, v, k, temperature)
    for red in ("none", "batchmean"):
        a, ga, b, gb = _both(s, idx, lp, temperature, divergence=divergence, missing_mass=rule,
                             reduction=red)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("divergence,rule", COMBOS)
def test_fp32_matches_reference(divergence, rule, seed):
    n, v, k, temp = 9, 301, 17, 2.0
    s = torch.randn(n, v) * 4
    _, idx, lp = _teacher(n, v, k, temp, dtype=torch.float32)
    a, ga, b, gb = _both(s, idx, lp, temp, divergence=divergence, missing_mass=rule)
    torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence,rule", COMBOS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "sum", "mean"])
def test_k_equal_v_is_the_dense_loss(divergence, rule, dtype, tol, reduction, seed):
    n, v, temp = 6, 37, 1.7
    t = torch.randn(n, v, dtype=dtype) * 3
    s = torch.randn(n, v, dtype=dtype) * 3
    lp = torch.log_softmax(t.double() / temp, dim=-1).to(dtype)
    idx = torch.stack([torch.randperm(v) for _ in range(n)])  # any order of all V tokens
    lpk = lp.gather(-1, idx)
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    a = topk_kd_loss(s1, idx, lpk, temp, divergence=divergence, missing_mass=rule, reduction=reduction)
    d = kdengine.kd_loss(s2, t, temp, divergence=divergence, reduction=reduction, backend="reference")
    torch.testing.assert_close(a, d, rtol=tol, atol=tol)
    a.sum().backward()
    d.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("divergence,rule", COMBOS)
def test_gradcheck_float64(divergence, rule, seed):
    n, v, k, temp = 3, 11, 4, 1.5
    s = (torch.randn(n, v, dtype=torch.float64) * 2).requires_grad_()
    _, idx, lp = _teacher(n, v, k, temp)
    labels = torch.tensor([1, -100, 7])

    def f(x):
        return topk_kd_loss(x, idx, lp, temp, divergence=divergence, missing_mass=rule,
                            labels=labels, hard_weight=0.3, label_smoothing=0.1, reduction="none")

    assert torch.autograd.gradcheck(f, (s,))


@pytest.mark.parametrize("divergence,rule", COMBOS)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
def test_labels_hard_ce_ignore_index(divergence, rule, reduction, seed):
    n, v, k, temp = 7, 23, 6, 2.0
    s = torch.randn(n, v, dtype=torch.float64) * 2
    _, idx, lp = _teacher(n, v, k, temp)
    labels = torch.randint(0, v, (n,))
    labels[[1, 4]] = -1
    s[1] = float("nan")  # an ignored row cannot leak NaN
    a, ga, b, gb = _both(s, idx, lp, temp, divergence=divergence, missing_mass=rule,
                         labels=labels, hard_weight=0.4, ignore_index=-1, label_smoothing=0.05,
                         reduction=reduction)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)
    assert torch.isfinite(ga).all()
    assert (ga[[1, 4]] == 0).all()
    if reduction == "none":
        assert (a[[1, 4]] == 0).all()


def test_hard_ce_part_matches_dense_kd_loss(seed):
    """With k = V the whole loss (KD + CE, smoothing, ignored rows) equals kd_loss."""
    n, v, temp = 8, 19, 3.0
    s = torch.randn(n, v, dtype=torch.float64)
    t = torch.randn(n, v, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    labels[2] = -100
    vals, idx = torch.log_softmax(t / temp, -1).topk(v, -1)
    kw = dict(labels=labels, hard_weight=0.3, label_smoothing=0.1)
    for rule in ("renormalize", "tail", "uniform"):
        a = topk_kd_loss(s, idx, vals, temp, missing_mass=rule, **kw)
        d = kdengine.kd_loss(s, t, temp, backend="reference", **kw)
        torch.testing.assert_close(a, d, rtol=1e-10, atol=1e-12)


def test_hard_weight_one_ignores_the_teacher(seed):
    s = torch.randn(5, 9, dtype=torch.float64)
    _, idx, lp = _teacher(5, 9, 3, 1.0)
    labels = torch.randint(0, 9, (5,))
    a = topk_kd_loss(s, idx, lp, labels=labels, hard_weight=1.0)
    torch.testing.assert_close(a, torch.nn.functional.cross_entropy(s, labels))


@pytest.mark.parametrize("dtype,gtol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)])
def test_topk_kd_rows_contract(dtype, gtol, seed):
    n, v, k = 5, 29, 7
    s = (torch.randn(n, v) * 2).to(dtype)
    _, idx, lp = _teacher(n, v, k, 2.0, dtype=torch.float32)
    labels = torch.randint(0, v, (n,))
    labels[0] = -100
    cfg = make_topk_config(2.0, missing_mass="tail", hard_weight=0.25, has_labels=True)
    assert isinstance(cfg, TopKConfig)
    rows, grad = topk_kd_rows(s.contiguous(), idx, lp, cfg, labels)
    assert rows.shape == (n,) and rows.dtype == torch.float32
    assert grad.shape == (n, v) and grad.dtype == dtype
    x = s.double().requires_grad_()
    ref = topk_kd_rows_reference(x, idx, lp, labels, cfg)
    ref.sum().backward()
    torch.testing.assert_close(rows.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), x.grad, rtol=gtol, atol=gtol / 10)
    assert rows[0] == 0 and (grad[0] == 0).all()
    # chunking rows does not change anything (the fused-linear path calls it per chunk)
    r1, g1 = topk_kd_rows(s[:2].contiguous(), idx[:2], lp[:2], cfg, labels[:2])
    torch.testing.assert_close(r1, rows[:2])
    torch.testing.assert_close(g1, grad[:2])


@pytest.mark.parametrize("divergence,rule", COMBOS)
def test_extreme_logits_and_zero_probability_entries(divergence, rule, seed):
    n, v, k, temp = 4, 31, 6, 1.0
    s = torch.randn(n, v, dtype=torch.float64) * 1e4
    t = s + torch.randn(n, v, dtype=torch.float64) * 3  # teacher and student agree roughly
    t[0] = torch.randn(v, dtype=torch.float64) * 1e4  # and one row where they do not
    vals, idx = torch.log_softmax(t / temp, -1).topk(k, -1)
    # zero-probability teacher entries in two rows: under reverse KL those rows are +inf (the
    # student's probability is never exactly 0, even where it underflows)
    vals[:2, -2:] = -math.inf
    for dtype in (torch.float64, torch.float32):
        a, ga, b, gb = _both(s.to(dtype), idx, vals.to(dtype), temp, divergence=divergence,
                             missing_mass=rule, reduction="none")
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5, equal_nan=True)
        # the gradient of an infinite row loss is not defined; compare the finite rows
        fin = torch.isfinite(b)
        if divergence == "reverse_kl":
            assert torch.isposinf(a[:2]).all()
        assert torch.isfinite(a[fin]).all() and torch.isfinite(ga[fin]).all()
        torch.testing.assert_close(ga[fin], gb[fin].to(ga.dtype), rtol=1e-5, atol=1e-5)


def test_forward_kl_finite_on_moderate_inputs_with_minus_inf():
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[3, 0]])
    lp = torch.tensor([[math.log(0.7), -math.inf]], dtype=torch.float64)
    for rule in ("renormalize", "tail", "uniform"):
        loss = topk_kd_loss(s, idx, lp, missing_mass=rule)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        s.grad = None


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_propagates(where):
    s = torch.randn(3, 10)
    _, idx, lp = _teacher(3, 10, 4, 1.0, dtype=torch.float32)
    if where == "student":
        s[1, 2] = float("nan")
    else:
        lp[1, 0] = float("nan")
    out = topk_kd_loss(s, idx, lp, reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


def test_low_precision_student(seed):
    s = torch.randn(6, 50) * 2
    _, idx, lp = _teacher(6, 50, 10, 2.0, dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16):
        x = s.to(dtype).requires_grad_()
        loss = topk_kd_loss(x, idx, lp, 2.0, missing_mass="tail")
        loss.backward()
        assert loss.dtype == dtype and x.grad.dtype == dtype
        ref = topk_kd_loss(s.to(dtype).double(), idx, lp.double(), 2.0, missing_mass="tail",
                           backend="reference")
        torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-2)


def test_leading_dims_and_module(seed):
    s = torch.randn(2, 3, 17, requires_grad=True)
    _, idx, lp = _teacher(6, 17, 5, 2.0, dtype=torch.float32)
    idx, lp = idx.reshape(2, 3, 5), lp.reshape(2, 3, 5)
    mod = TopKKDLoss(2.0, missing_mass="uniform", reduction="none")
    out = mod(s, idx, lp)
    assert out.shape == (2, 3)
    flat = topk_kd_loss(s.reshape(6, 17), idx.reshape(6, 5), lp.reshape(6, 5), 2.0,
                        missing_mass="uniform", reduction="none")
    torch.testing.assert_close(out.reshape(6), flat)
    assert "uniform" in repr(mod)
    with pytest.raises(ValueError, match="missing_mass"):
        TopKKDLoss(missing_mass="drop")


def test_empty_batch():
    s = torch.randn(0, 9, requires_grad=True)
    loss = topk_kd_loss(s, torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3))
    loss.backward()
    assert loss.item() == 0.0


def test_bad_inputs_name_the_argument():
    s = torch.randn(2, 10)
    _, idx, lp = _teacher(2, 10, 3, 1.0, dtype=torch.float32)
    with pytest.raises(ValueError, match="topk_indices"):
        topk_kd_loss(s, idx + 10, lp)
    with pytest.raises(ValueError, match="topk_indices"):
        topk_kd_loss(s, idx - 10, lp)
    with pytest.raises(ValueError, match="topk_indices.*repeated"):
        topk_kd_loss(s, torch.tensor([[1, 1, 2], [0, 1, 2]]), lp)
    with pytest.raises(ValueError, match="topk_logprobs"):
        topk_kd_loss(s, idx, lp.abs() + 0.1)
    with pytest.raises(ValueError, match="topk_logprobs.*sum"):
        topk_kd_loss(s, idx, torch.full((2, 3), math.log(0.5)))
    with pytest.raises(ValueError, match="topk_logprobs"):
        topk_kd_loss(s, idx, lp[:, :2])
    with pytest.raises(ValueError, match="topk_indices"):
        topk_kd_loss(s, idx[:1], lp[:1])
    with pytest.raises(ValueError, match="topk_indices"):
        topk_kd_loss(s[:, :2], idx.clamp(max=1), lp)  # k > V
    with pytest.raises(TypeError, match="topk_indices"):
        topk_kd_loss(s, idx.float(), lp)
    with pytest.raises(TypeError, match="topk_logprobs"):
        topk_kd_loss(s, idx, idx)
    with pytest.raises(ValueError, match="reverse_kl.*renormalize"):
        topk_kd_loss(s, idx, lp, divergence="reverse_kl")
    with pytest.raises(ValueError, match="divergence"):
        topk_kd_loss(s, idx, lp, divergence="jsd")
    with pytest.raises(ValueError, match="temperature"):
        topk_kd_loss(s, idx, lp, float("inf"))
    with pytest.raises(ValueError, match="labels"):
        topk_kd_loss(s, idx, lp, labels=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="hard_weight"):
        topk_kd_loss(s, idx, lp, hard_weight=0.5)
    with pytest.raises(ValueError, match="backend"):
        topk_kd_loss(s, idx, lp, backend="cuda")
    with pytest.raises(ValueError, match="renormalise"):
        topk_kd_loss(s, idx, torch.full((2, 3), -math.inf))
    # a zero-mass row is fine for the other rules (all missing mass)
    assert torch.isfinite(topk_kd_loss(s, idx, torch.full((2, 3), -math.inf), missing_mass="tail"))


def test_mass_tolerance_for_bf16_cache_values(seed):
    """bf16-rounded log-probs of a near-complete top-k may sum slightly above 1: accepted."""
    t = torch.randn(16, 40)
    vals, idx = torch.log_softmax(t * 5, -1).topk(40, -1)
    lp = vals.to(torch.bfloat16)
    out = topk_kd_loss(torch.randn(16, 40), idx, lp, missing_mass="tail")
    assert torch.isfinite(out)


def test_double_backward_is_a_clear_error():
    s = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    _, idx, lp = _teacher(3, 8, 2, 1.0)
    loss = topk_kd_loss(s, idx, lp)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


def test_retemper_is_exact_for_renormalize(seed):
    n, v, k = 4, 30, 6
    t = torch.randn(n, v, dtype=torch.float64) * 3
    vals1, idx = torch.log_softmax(t, -1).topk(k, -1)
    lp2 = retemper_topk(vals1, 1.0, 2.0)
    s = torch.randn(n, v, dtype=torch.float64)
    direct = torch.log_softmax(t / 2.0, -1).gather(-1, idx)
    a = topk_kd_loss(s, idx, lp2, 2.0)
    b = topk_kd_loss(s, idx, direct, 2.0)
    torch.testing.assert_close(a, b)


def _native_available() -> bool:
    from kdengine import _native

    return _native.has_op("cpu", "topk_student_stats")


native = pytest.mark.skipif("not _native_available()", reason="native CPU extension unavailable")


@native
@pytest.mark.parametrize("divergence,rule", COMBOS)
@pytest.mark.parametrize("case", ["random", "peaked", "k_eq_v", "odd_v", "masked", "cold"])
def test_cpu_kernel_matches_torch_and_reference(divergence, rule, case, seed):
    """The C++ student side (backend='cpu') against the torch path and the float64 reference."""
    n, v, k, temp = 5, 1031, 16, 2.0  # V not a multiple of 8 nor of the 512 block
    s = torch.randn(n, v) * 3
    _, idx, lp = _teacher(n, v, k, temp, dtype=torch.float32)
    if case == "peaked":  # the student puts almost all its mass on K: R tiny, no cancellation
        s.scatter_(-1, idx, 40.0)
    elif case == "k_eq_v":
        v = k = 37
        s = torch.randn(n, v) * 3
        _, idx, lp = _teacher(n, v, k, temp, dtype=torch.float32)
    elif case == "odd_v":
        v, k = 13, 5
        s = torch.randn(1, v)
        _, idx, lp = _teacher(1, v, k, temp, dtype=torch.float32)
    elif case == "masked":  # -inf student logits off K
        s[:, :7] = -math.inf
        s.scatter_(-1, idx, s.gather(-1, idx).clamp(min=-10.0))
    elif case == "cold":
        temp = 0.25
        _, idx, lp = _teacher(n, v, k, temp, dtype=torch.float32)
    kw = dict(divergence=divergence, missing_mass=rule, reduction="none")
    out = {}
    for be in ("cpu", "torch", "reference"):
        x = s.clone().requires_grad_()
        loss = topk_kd_loss(x, idx, lp, temp, backend=be, **kw)
        loss.sum().backward()
        out[be] = (loss.detach().double(), x.grad.double())
    for be in ("cpu", "torch"):
        torch.testing.assert_close(out[be][0], out["reference"][0], rtol=2e-5, atol=2e-5, equal_nan=True)
        torch.testing.assert_close(out[be][1], out["reference"][1], rtol=2e-4, atol=2e-6, equal_nan=True)


@native
def test_cpu_kernel_nan_and_forward_only(seed):
    s = torch.randn(3, 100)
    _, idx, lp = _teacher(3, 100, 8, 1.5, dtype=torch.float32)
    s[1, 50] = float("nan")
    for rule in ("renormalize", "tail", "uniform"):
        out = topk_kd_loss(s, idx, lp, 1.5, missing_mass=rule, reduction="none", backend="cpu")
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
        ref = topk_kd_loss(s, idx, lp, 1.5, missing_mass=rule, reduction="none", backend="torch")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@native
def test_cpu_kernel_portable_build_agrees(monkeypatch, seed):
    s = torch.randn(4, 700, requires_grad=True)
    _, idx, lp = _teacher(4, 700, 9, 2.0, dtype=torch.float32)
    a = topk_kd_loss(s, idx, lp, 2.0, missing_mass="tail", backend="cpu")
    (ga,) = torch.autograd.grad(a, s)
    monkeypatch.setenv("KDENGINE_CPU_PORTABLE", "1")
    b = topk_kd_loss(s, idx, lp, 2.0, missing_mass="tail", backend="cpu")
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)
