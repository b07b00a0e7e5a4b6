"""CPU-backend specifics of kd_loss (csrc/kd_loss/kd_loss.cpp) that the shared backend tests do not reach.

The C++ kernel processes a row in blocks of 512 elements with running maxima (online softmax), so
long rows exercise code that short ones do not: rescaling when the maximum grows, blocks that are
entirely masked, a NaN late in the row. It also splits rows over threads and has a portable, an
AVX2 and an AVX-512 build (``cpu_float_path`` forces each one this CPU has). Everything is checked
against the float64 reference on fresh random inputs.
"""
from __future__ import annotations

import math

import pytest
import torch

import kdengine
from kdengine import _dispatch

pytestmark = pytest.mark.skipif(
    not _dispatch.backend_availability("cpu", "cpu").available,
    reason=f"cpu backend: {_dispatch.backend_availability('cpu', 'cpu').reason}",
)


def _run(backend, s, t, *, teacher_grad=False, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    loss = kdengine.kd_loss(s, t, backend=backend, **kw)
    loss.sum().backward()
    return loss.detach(), s.grad, (t.grad if teacher_grad else None)


def _close(actual, expected, rtol, atol_rel, what, floor=1e-30):
    """allclose with an absolute floor relative to the largest expected magnitude (at least `floor`)."""
    if expected is None:
        expected = torch.zeros_like(actual)
    a, e = actual.double(), expected.double()
    atol = atol_rel * float(e.abs().max()) + floor
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        i = int(((a - e).abs() / (atol + rtol * e.abs())).nan_to_num(math.inf).flatten().argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} mismatch; worst at flat "
                             f"index {i}: {a.flatten()[i].item():.9g} vs {e.flatten()[i].item():.9g} "
                             f"(rtol {rtol}, atol {atol:.3g})")


def _compare(s, t, dtype, rtol, teacher_grad=False, floor=1e-30, **kw):
    out = _run("cpu", s.to(dtype), t.to(dtype), teacher_grad=teacher_grad, **kw)
    ref = _run("reference", s.to(dtype).double(), t.to(dtype).double(), teacher_grad=teacher_grad, **kw)
    _close(out[0], ref[0], rtol, rtol, f"loss {kw}", floor)
    _close(out[1], ref[1], rtol, 1e-7 if dtype != torch.float64 else 1e-12, f"grad_s {kw}", floor)
    if teacher_grad:
        _close(out[2], ref[2], rtol, 1e-7 if dtype != torch.float64 else 1e-12, f"grad_t {kw}", floor)
    return out


CONFIGS = [
    dict(temperature=2.0),
    dict(temperature=0.7, divergence="reverse_kl"),
    dict(temperature=1.5, divergence="jsd", beta=0.3),
    dict(temperature=math.inf),
    dict(temperature=1.0, hard_weight=0.4, label_smoothing=0.1, with_labels=True),
    dict(temperature=3.0, hard_weight=1.0, with_labels=True),
]


def _kw(cfg, n, v):
    kw = dict(cfg)
    if kw.pop("with_labels", False):
        labels = torch.randint(0, v, (n,))
        labels[0] = -100
        kw["labels"] = labels
    return kw


@pytest.mark.parametrize("cfg", CONFIGS, ids=["fkl", "rkl", "jsd", "inf", "ce", "ce_only"])
def test_results_do_not_depend_on_thread_count(cfg, seed):
    """Rows are split over threads; per-row losses are reduced in row order afterwards."""
    n, v = 24, 1500
    s, t = torch.randn(n, v) * 3, torch.randn(n, v) * 3
    kw = _kw(cfg, n, v)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run("cpu", s, t, teacher_grad=True, **kw)
        torch.set_num_threads(2)
        two = _run("cpu", s, t, teacher_grad=True, **kw)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b), f"seed={seed}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=["fkl", "rkl", "jsd", "inf", "ce", "ce_only"])
def test_long_rows_match_float64_reference(cfg, cpu_float_path, seed):
    """V = 50257 (GPT-2's vocabulary: odd, ~100 blocks): fp32 within 1e-5 of the float64 oracle."""
    n, v = 3, 50257
    s, t = torch.randn(n, v, dtype=torch.float64) * 4, torch.randn(n, v, dtype=torch.float64) * 4
    _compare(s, t, torch.float32, 1e-5, **_kw(cfg, n, v))
    _compare(s, t, torch.float64, 1e-10, **_kw(cfg, n, v))


def _awkward_rows(v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose maximum keeps growing, appears only late, or follows fully masked blocks."""
    ramp = torch.linspace(-30.0, 30.0, v, dtype=torch.float64)
    s = torch.randn(4, v, dtype=torch.float64) * 2
    t = torch.randn(4, v, dtype=torch.float64) * 2
    s[0] += ramp  # new maxima in every block
    t[0] += 0.5 * ramp
    s[1, v - 3] = 40.0  # one large logit at the very end
    t[1, v // 2] = 35.0
    s[2, :1100] = -math.inf  # two and a bit blocks masked in both inputs
    t[2, :1100] = -math.inf
    mask = torch.rand(v) < 0.4
    s[3] = s[3].masked_fill(mask, -math.inf)
    t[3] = t[3].masked_fill(mask, -math.inf)
    return s, t


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, math.inf], ids=["T1", "T2.5", "Tinf"])
def test_running_maximum_and_masked_blocks(divergence, temperature, cpu_float_path, seed):
    v = 2600
    s, t = _awkward_rows(v)
    kw = dict(temperature=temperature, divergence=divergence, reduction="none")
    # float64 path: the same algorithm in double, so it must match the oracle tightly.
    _compare(s, t, torch.float64, 1e-10, teacher_grad=True, **kw)
    out = _compare(s, t, torch.float32, 1e-5, **kw)
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1]).all()
    assert bool((out[1][2, :1100] == 0).all()), "masked entries must get exactly zero gradient"
    labels = torch.tensor([3, v - 3, 2000, int((~torch.isinf(s[3])).nonzero()[0])])
    _compare(s, t, torch.float64, 1e-10, labels=labels, hard_weight=0.3,
             **{**kw, "temperature": temperature})


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("temperature", [2.0, math.inf], ids=["T2", "Tinf"])
def test_nan_late_in_a_long_row(where, temperature, cpu_float_path):
    s, t = torch.randn(3, 2600), torch.randn(3, 2600)
    (s if where == "student" else t)[1, 2555] = float("nan")
    rows = kdengine.kd_loss(s, t, temperature, reduction="none", backend="cpu")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_long_rows_round_once(dtype, cpu_float_path, seed):
    """bf16/fp16 gradients over many blocks: within one ulp of the exact gradient per element."""
    base = torch.randn(3, 4099, dtype=torch.float64) * 3
    s = base.to(dtype)
    t = (base + 0.02 * torch.randn_like(base)).to(dtype)
    _, gs, _ = _run("cpu", s, t, temperature=2.0)
    _, rgs, _ = _run("reference", s.double(), t.double(), temperature=2.0)
    fi = torch.finfo(dtype)
    err = (gs.double() - rgs).abs()
    assert bool((err <= fi.eps * rgs.abs() + fi.tiny * fi.eps).all()), f"seed={seed}"


def test_portable_build_matches_the_avx2_build(monkeypatch, seed):
    """KDENGINE_CPU_PORTABLE=1 selects the portable build (the only one on CPUs without AVX2). The
    builds sum in different orders and use different exp/log polynomials: entries ~1e-6 of the
    largest gradient (JSD at T = 0.5) differ by ~4e-5 relative between builds, as each does from
    the float64 oracle, hence an absolute floor of 1e-6 of the largest value."""
    s, t = torch.randn(5, 1029) * 3, torch.randn(5, 1029) * 3
    labels = torch.tensor([0, 5, -100, 1028, 77])
    for kw in (dict(temperature=2.0), dict(temperature=0.5, divergence="jsd", labels=labels,
                                           hard_weight=0.2, label_smoothing=0.1)):
        fast = _run("cpu", s, t, teacher_grad=True, **kw)
        monkeypatch.setenv("KDENGINE_CPU_PORTABLE", "1")
        portable = _run("cpu", s, t, teacher_grad=True, **kw)
        monkeypatch.delenv("KDENGINE_CPU_PORTABLE")
        for a, b in zip(fast, portable):
            _close(a, b, 1e-5, 1e-6, f"seed={seed} {kw}")


@pytest.mark.parametrize("v", [1, 2, 5], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_p_minus_q_when_p_and_q_are_far_apart(v, dtype, cpu_float_path, seed):
    """bf16/fp16 rows form p - q from the log-ratio and log(Sb/Sa) = log1p(sum q expm1(.)); that
    sum is float, so near -1 (nearly one-hot p and q on different classes, T <= 1) log1p amplifies
    its rounding a thousandfold. Such rows must take the direct form: p - q within the dtype's
    rounding of the float64 oracle (an exactly-0 gradient at V = 1 stays below 1e-5)."""
    n = 16
    s, t = torch.randn(n, v, dtype=torch.float64) * 6, torch.randn(n, v, dtype=torch.float64) * 6
    s[:, 0] += 10.0       # the student sure of class 0 ...
    t[:, -1] += 10.0      # ... the teacher of the last one (the same one at V = 1)
    for kw in (dict(temperature=0.9, divergence="reverse_kl"), dict(temperature=0.5),
               dict(temperature=1.0, divergence="reverse_kl")):
        _compare(s, t, dtype, 2e-2, teacher_grad=True, floor=1e-5, **kw)


@pytest.mark.parametrize("v", [1, 13, 17, 31, 511, 513, 1031], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_path_odd_row_lengths(v, dtype, cpu_float_path, seed):
    """Rows shorter than a vector, one lane past a vector or a block, primes: the partial last
    vector of each build (8 or 16 floats) against the float64 oracle, teacher gradient too. (V = 1:
    the KD gradient is exactly 0, and the float builds leave rounding residue of the unit scale of
    the softmax, hence the absolute floor; fp32 teacher gradients of JSD carry ~2e-5 relative.)"""
    s, t = torch.randn(6, v, dtype=torch.float64) * 3, torch.randn(6, v, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (6,))
    for kw in (dict(temperature=2.0), dict(temperature=0.9, divergence="reverse_kl"),
               dict(temperature=1.0, divergence="jsd", beta=0.4, labels=labels, hard_weight=0.3)):
        _compare(s, t, dtype, 5e-5 if dtype == torch.float32 else 2e-2, teacher_grad=True,
                 floor=1e-6 if dtype == torch.float32 else 1e-5, **kw)

