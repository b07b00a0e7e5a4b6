"""kd_loss: every backend against the float64 reference, with the same parametrized tests.

Shapes stay small so the Triton interpreter (CPU) can run every case; they include V = 1, primes
and sizes that are not multiples of any block size. Inputs are fresh random draws each run.
"""
from __future__ import annotations

import math

import pytest
import torch

import kdengine
from kdengine import _dispatch
from kdengine.ops.kd_loss.config import KDConfig, Reduction
from tests.backend_params import backend_params

BACKENDS = backend_params("kd_loss")
SHAPES = [(1, 1), (3, 7), (2, 37), (4, 257)]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
TEMPS = [1.0, 2.5, math.inf]


def _logits(shape, scale=3.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def _run(backend, s, t, *, teacher_grad=False, grad_scale=1.0, **kw):
    """Loss and gradients of kd_loss on ``backend``; inputs are copied as leaves."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = kdengine.kd_loss(s, t, backend=backend, **kw)
    (loss.sum() * grad_scale).backward()
    return loss.detach(), s.grad, (t.grad if teacher_grad else None)


def _reference(s, t, **kw):
    return _run("reference", s.double(), t.double(), **kw)


def _close(actual, expected, rtol, atol, what):
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", TEMPS, ids=["T1", "T2.5", "Tinf"])
def test_fp32_matches_float64_reference(backend, shape, divergence, temperature, seed):
    s, t = _logits(shape), _logits(shape)
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3)
    loss, gs, _ = _run(backend, s, t, **kw)
    rloss, rgs, _ = _reference(s, t, **kw)
    _close(loss, rloss, 1e-5, 1e-6, f"loss seed={seed}")
    _close(gs, rgs, 1e-5, 1e-6, f"grad seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
@pytest.mark.parametrize("with_labels", [False, True], ids=["nolabels", "labels"])
def test_reductions_and_hard_labels(backend, reduction, with_labels, seed):
    shape = (2, 3, 11)  # extra leading dim: (..., V) inputs
    s, t = _logits(shape), _logits(shape)
    kw = dict(temperature=2.0, reduction=reduction)
    if with_labels:
        labels = torch.randint(0, 11, shape[:-1])
        labels[0, 1] = -100
        labels[1, 2] = 7  # keep at least one real label
        kw.update(labels=labels, hard_weight=0.3, label_smoothing=0.1)
    # A non-unit, per-row incoming gradient checks that backward scales the saved gradient.
    loss, gs, _ = _run(backend, s, t, grad_scale=1.7, **kw)
    rloss, rgs, _ = _reference(s, t, grad_scale=1.7, **kw)
    assert loss.shape == (shape[:-1] if reduction == "none" else ())
    _close(loss, rloss, 1e-5, 1e-6, f"loss seed={seed}")
    _close(gs, rgs, 1e-5, 1e-6, f"grad seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.7, math.inf], ids=["T0.7", "Tinf"])
def test_teacher_gradient(backend, divergence, temperature, seed):
    s, t = _logits((3, 19)), _logits((3, 19))
    labels = torch.tensor([4, -100, 18])
    kw = dict(temperature=temperature, divergence=divergence, labels=labels, hard_weight=0.25)
    loss, gs, gt = _run(backend, s, t, teacher_grad=True, **kw)
    rloss, rgs, rgt = _reference(s, t, teacher_grad=True, **kw)
    _close(loss, rloss, 1e-5, 1e-6, f"loss seed={seed}")
    _close(gs, rgs, 1e-5, 1e-6, f"student grad seed={seed}")
    _close(gt, rgt, 1e-5, 1e-6, f"teacher grad seed={seed}")
    assert gt[1].abs().max() == 0, "ignored row must not reach the teacher"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=2.0),
        dict(temperature=0.5, divergence="reverse_kl"),
        dict(temperature=1.5, divergence="jsd", beta=0.7),
        dict(temperature=math.inf),
        dict(temperature=3.0, labels=torch.tensor([1, 0, 4]), hard_weight=0.4, label_smoothing=0.2),
    ],
    ids=["fkl", "rkl", "jsd", "inf", "labels"],
)
def test_gradcheck_float64(backend, kw, seed):
    s = _logits((3, 5), dtype=torch.float64).requires_grad_(True)
    t = _logits((3, 5), dtype=torch.float64).requires_grad_(True)
    fn = lambda a, b: kdengine.kd_loss(a, b, backend=backend, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_low_precision_gradient_formed_in_fp32(backend, dtype, divergence, seed):
    # Student and teacher close together: p - q cancels, which is where a bf16 gradient breaks.
    base = _logits((4, 301), dtype=torch.float64)
    s = base.to(dtype)
    t = (base + 0.02 * torch.randn_like(base)).to(dtype)
    kw = dict(temperature=2.0, divergence=divergence)
    loss, gs, _ = _run(backend, s, t, **kw)
    rloss, rgs, _ = _reference(s, t, **kw)  # the same rounded inputs, in float64
    assert loss.dtype == dtype and gs.dtype == dtype
    fi = torch.finfo(dtype)
    ulp = fi.eps
    # Rounded once from an fp32 value: within one ulp of the exact gradient, element by element
    # (plus the subnormal spacing, for fp16 gradients below its normal range).
    err = (gs.double() - rgs).abs()
    tol = ulp * rgs.abs() + fi.tiny * fi.eps
    assert bool((err <= tol).all()), f"max rel err {float((err / rgs.abs().clamp_min(1e-30)).max())}"
    assert abs(float(loss) - float(rloss)) <= ulp * abs(float(rloss)) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, math.inf], ids=["T1", "Tinf"])
def test_extreme_and_masked_logits(backend, divergence, temperature, seed):
    s, t = _logits((3, 23), scale=1e4), _logits((3, 23), scale=1e4)
    mask = torch.rand(3, 23) < 0.3
    mask[:, 0] = False  # every row keeps some vocabulary
    s = s.masked_fill(mask, -math.inf)
    t = t.masked_fill(mask, -math.inf)
    kw = dict(temperature=temperature, divergence=divergence)
    loss, gs, _ = _run(backend, s, t, **kw)
    rloss, rgs, _ = _reference(s, t, **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all()
    assert bool((gs[mask] == 0).all())
    _close(loss, rloss, 1e-5, 1e-6, f"loss seed={seed}")
    # Reverse KL / JSD gradients cancel terms of size |logit|/T ~ 1e4: fp32 rounding of those
    # (eps * 1e4 ~ 1e-3) is the floor any fp32 implementation has here.
    atol = 1e-7 * float(rgs.abs().max()) if divergence == "forward_kl" else 8 * 1.2e-7 * 1e4
    _close(gs, rgs, 1e-5, atol, f"grad seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_gives_nan_out(backend, where):
    s, t = _logits((3, 17)), _logits((3, 17))
    (s if where == "student" else t)[1, 5] = float("nan")
    rows = kdengine.kd_loss(s, t, 2.0, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    assert torch.isnan(kdengine.kd_loss(s, t, 2.0, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_drop_out_everywhere(backend):
    s, t = _logits((4, 9)), _logits((4, 9))
    s[2] = float("nan")  # an ignored row may hold anything
    labels = torch.tensor([3, -1, -1, 0])
    kw = dict(temperature=2.0, labels=labels, ignore_index=-1, hard_weight=0.5)
    loss, gs, _ = _run(backend, s, t, **kw)
    kept = kdengine.kd_loss(s[[0, 3]], t[[0, 3]], 2.0, labels=labels[[0, 3]], hard_weight=0.5,
                            backend="reference")
    _close(loss, kept.detach(), 1e-5, 1e-7, "batchmean counts only the kept rows")
    assert bool((gs[1:3] == 0).all())
    # All rows ignored: 0, not NaN, and zero gradients.
    loss0, gs0, _ = _run(backend, s, t, **{**kw, "labels": torch.full((4,), -1)})
    assert float(loss0) == 0.0 and bool((gs0 == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_label_gives_nan_row_in_the_kernel(backend):
    """Compiled graphs skip the eager range check; the kernel must then write NaN, not read OOB."""
    s, t = _logits((2, 5)), _logits((2, 5))
    cfg = KDConfig(temperature=1.0, hard_weight=0.5, reduction=Reduction.NONE)
    loss, _, _ = _dispatch.implementation("kd_loss", backend)(s, t, torch.tensor([2, 9]), cfg)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_high_temperature_tends_to_the_exact_limit(backend, seed):
    """docs/papers.md section 1: T^2 KL -> the centered logits-matching limit, error O(1/T)."""
    s, t = _logits((3, 13), dtype=torch.float64), _logits((3, 13), dtype=torch.float64)
    limit, glim, _ = _run(backend, s, t, temperature=math.inf)
    lm = kdengine.logits_matching_loss(s, t, centered=True)
    _close(limit, lm, 1e-10, 1e-12, "T=inf equals centered logits matching")
    errs = []
    for temp in (1e2, 1e3, 1e4):
        _, g, _ = _run(backend, s, t, temperature=temp)
        errs.append(float((g - glim).abs().max()))
    # Each 10x in T cuts the gradient gap ~10x (O(1/T)).
    assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5, errs


def test_bad_inputs_name_the_argument():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    cases = [
        (lambda: kdengine.kd_loss(s, torch.randn(2, 6)), ValueError, "vocabulary"),
        (lambda: kdengine.kd_loss(s, torch.randn(3, 5)), ValueError, "same shape"),
        (lambda: kdengine.kd_loss(s, t, 0.0), ValueError, "temperature"),
        (lambda: kdengine.kd_loss(s, t, -1.0), ValueError, "temperature"),
        (lambda: kdengine.kd_loss(s, t, float("nan")), ValueError, "temperature"),
        (lambda: kdengine.kd_loss(s, t, "2"), TypeError, "temperature"),
        (lambda: kdengine.kd_loss(s.long(), t), TypeError, "student_logits"),
        (lambda: kdengine.kd_loss(s, t.int()), TypeError, "teacher_logits"),
        (lambda: kdengine.kd_loss(s, [1.0]), TypeError, "teacher_logits"),
        (lambda: kdengine.kd_loss(torch.randn(2, 0), torch.randn(2, 0)), ValueError, "V = 0"),
        (lambda: kdengine.kd_loss(s, t, labels=torch.tensor([1.0, 2.0])), TypeError, "labels"),
        (lambda: kdengine.kd_loss(s, t, labels=torch.tensor([1, 2, 3])), ValueError, "labels"),
        (lambda: kdengine.kd_loss(s, t, labels=torch.tensor([1, 5])), ValueError, "labels"),
        (lambda: kdengine.kd_loss(s, t, labels=torch.tensor([1, -3])), ValueError, "labels"),
        (lambda: kdengine.kd_loss(s, t, reduction="avg"), ValueError, "reduction"),
        (lambda: kdengine.kd_loss(s, t, divergence="kl2"), ValueError, "divergence"),
        (lambda: kdengine.kd_loss(s, t, divergence="jsd", beta=0.0), ValueError, "beta"),
        (lambda: kdengine.kd_loss(s, t, hard_weight=0.5), ValueError, "labels"),
        (lambda: kdengine.kd_loss(s, t, labels=torch.tensor([1, 2]), hard_weight=1.5), ValueError,
         "hard_weight"),
        (lambda: kdengine.kd_loss(s, t, labels=torch.tensor([1, 2]), label_smoothing=1.0),
         ValueError, "label_smoothing"),
        (lambda: kdengine.kd_loss(s, t, math.inf, scale_t2=False), ValueError, "scale_t2"),
        (lambda: kdengine.kd_loss(s, t, backend="gpu"), ValueError, "backend"),
        (lambda: kdengine.kd_loss(s, t, torch.ones(2)), ValueError, "temperature"),
    ]
    for fn, exc, word in cases:
        with pytest.raises(exc, match=word):
            fn()


def test_devices_must_match():
    if not torch.cuda.is_available():
        meta = torch.randn(2, 5, device="meta")
        with pytest.raises(ValueError, match="device"):
            kdengine.kd_loss(torch.randn(2, 5), meta)
    else:
        with pytest.raises(ValueError, match="device"):
            kdengine.kd_loss(torch.randn(2, 5), torch.randn(2, 5, device="cuda"))


def test_mixed_dtypes_follow_the_student():
    s = torch.randn(3, 8, requires_grad=True)
    t = torch.randn(3, 8, dtype=torch.bfloat16)
    loss = kdengine.kd_loss(s, t, 2.0)
    assert loss.dtype == torch.float32
    ref = kdengine.kd_loss(s.detach(), t.float(), 2.0, backend="reference")
    torch.testing.assert_close(loss.detach(), ref)


def test_empty_batch():
    s, t = torch.randn(0, 5, requires_grad=True), torch.randn(0, 5)
    assert float(kdengine.kd_loss(s, t)) == 0.0
    assert kdengine.kd_loss(s, t, reduction="none").shape == (0,)


def test_forward_kl_matches_torch_kl_div(seed):
    s, t = _logits((6, 40)), _logits((6, 40))
    temp = 3.0
    ours = kdengine.kd_loss(s, t, temp)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(s / temp, -1), torch.log_softmax(t / temp, -1),
        reduction="batchmean", log_target=True) * temp**2
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    mean = kdengine.kd_loss(s, t, temp, reduction="mean", scale_t2=False)
    torch.testing.assert_close(mean, torch.nn.functional.kl_div(
        torch.log_softmax(s / temp, -1), torch.log_softmax(t / temp, -1),
        reduction="mean", log_target=True), rtol=1e-5, atol=1e-7)


def test_hard_weight_one_is_cross_entropy(seed):
    s, t = _logits((5, 10)), _logits((5, 10))
    y = torch.randint(0, 10, (5,))
    ours = kdengine.kd_loss(s, t, 4.0, labels=y, hard_weight=1.0, label_smoothing=0.1)
    ref = torch.nn.functional.cross_entropy(s, y, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_backend_selection(monkeypatch):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    monkeypatch.setenv("KDENGINE_BACKEND", "reference")
    assert _dispatch.resolve("kd_loss", s.device, None) == "reference"
    monkeypatch.setenv("KDENGINE_BACKEND", "nope")
    with pytest.raises(ValueError, match="KDENGINE_BACKEND"):
        kdengine.kd_loss(s, t)
    monkeypatch.setenv("KDENGINE_BACKEND", "reference")
    # The explicit argument wins over the environment variable.
    with pytest.raises(RuntimeError, match="cuda"):
        kdengine.kd_loss(s, t, backend="cuda")
    monkeypatch.delenv("KDENGINE_BACKEND")
    auto = _dispatch.resolve("kd_loss", s.device, "auto")
    expected = "cpu" if _dispatch.op_availability("kd_loss", "cpu", "cpu").available else "reference"
    assert auto == expected


def test_backends_report_every_op_and_reason():
    report = kdengine.backends()
    assert set(report["kd_loss"]) == set(_dispatch.BACKENDS)
    for entry in report["kd_loss"].values():
        assert isinstance(entry["available"], bool) and entry["reason"]
    assert report["kd_loss"]["reference"]["available"]


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_torch_compile_fullgraph(backend, seed):
    model = torch.nn.Linear(16, 11)
    teacher = torch.randn(6, 11)
    x = torch.randn(6, 16)
    y = torch.randint(0, 11, (6,))

    def step(inp):
        return kdengine.kd_loss(model(inp), teacher, 2.0, labels=y, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x)
    loss_c.backward()
    g_c = model.weight.grad.clone()
    model.weight.grad = None
    loss_e = step(x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_c, model.weight.grad, rtol=1e-5, atol=1e-6)


def test_kdloss_module_and_validation():
    crit = kdengine.KDLoss(2.0, divergence="jsd", beta=0.4)
    s, t = torch.randn(3, 9, requires_grad=True), torch.randn(3, 9)
    torch.testing.assert_close(crit(s, t), kdengine.kd_loss(s, t, 2.0, divergence="jsd", beta=0.4))
    assert "temperature=2.0" in repr(crit)
    with pytest.raises(ValueError, match="temperature"):
        kdengine.KDLoss(-1.0)
    with pytest.raises(ValueError, match="reduction"):
        kdengine.KDLoss(reduction="bogus")
