"""Bounds: K beyond int32 counts, padding bits edited after packing, IF thresholds / resets beyond
the state dtype's range: each gives an exact result or a clear error, the same on every backend."""
from __future__ import annotations

import math
import random

import pytest
import torch

from kdengine import _dispatch
from kdengine.ops import binary as bops
from kdengine.ops.binary import (
    PackedSigns, binary_conv2d, binary_linear, pack_signs, pack_spikes, spike_matmul, xnor_matmul,
)
from kdengine.ops.if_multistep import if_multistep
from tests.backend_params import backend_params

# --------------------------------------------------------------------------- K >= 2^31


@pytest.mark.parametrize("k", [2**31, 2**31 + 5, 2**40])
def test_packed_signs_rejects_k_beyond_int32(k):
    """The check runs before the shape check, so a claimed K needs no 2^31-bit tensor; the
    trusted constructor of the packers checks it too."""
    small = torch.zeros((2, 1), dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"k={k} is too large.*< 2\^31 = 2147483648"):
        PackedSigns(small, k)
    with pytest.raises(ValueError, match=rf"k={k} is too large.*2\^31"):
        PackedSigns._trusted(small, k)
    with pytest.raises(ValueError, match=rf"k={k} is too large"):
        PackedSigns(small, k, spikes=True)


def test_k_limit_boundary():
    bops.check_k_limit(2**31 - 1)
    with pytest.raises(ValueError, match="2147483648"):
        bops.check_k_limit(2**31)
    # the float packers check the K of x (a zero-stride view: no 2^31 floats allocated)
    x = torch.zeros(1, 1).expand(1, 2**31)
    with pytest.raises(ValueError, match=r"x's K=2147483648 is too large"):
        pack_signs(x)


def test_cpu_kernel_rejects_k_beyond_int32():
    """The C++ op itself (reachable through torch.ops) checks K too."""
    avail = _dispatch.op_availability("xnor_matmul", "cpu", "cpu")
    if not avail.available:
        pytest.skip(avail.reason)
    from kdengine import _native

    a = torch.zeros((1, 1), dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k=2147483648 is too large"):
        _native.ops("cpu").binary_gemm(a, a, 2**31, 0)


# --------------------------------------------------------------------------- padding bits


def _dirty(p: PackedSigns) -> PackedSigns:
    """A copy whose padding bits are then set in place (after the constructor's check)."""
    q = PackedSigns(p.bits.clone(), p.k, p.spikes)
    rem = p.k % 32
    if rem:
        rows = q.bits.reshape(-1, q.bits.shape[-1])
        junk = torch.randint(-(2**31), 2**31 - 1, (rows.shape[0],), dtype=torch.int32)
        junk[0] = -1  # at least one row with every padding bit set
        rows[:, -1] |= junk & (-(1 << rem))
        assert bool((rows[:, -1] & (-(1 << rem))).ne(0).any())
    return q


@pytest.mark.parametrize("backend", backend_params("xnor_matmul"))
@pytest.mark.parametrize("k", [1, 45, 100])
def test_padding_bits_set_after_packing_never_count(backend, k, seed):
    m, n = random.choice([1, 5, 20]), random.choice([3, 33])
    a, b = pack_signs(torch.randn(m, k)), pack_signs(torch.randn(n, k))
    s = pack_spikes(torch.rand(m, k) < 0.4)
    x = torch.randn(m, k, dtype=torch.float64)
    a_ref = a.unpack(torch.float64)
    b_ref = b.unpack(torch.float64)
    xnor = (a_ref @ b_ref.T).to(torch.int32)
    spike = (s.unpack(torch.float64) @ b_ref.T).to(torch.int32)
    lin = torch.where(x >= 0, 1.0, -1.0).double() @ b_ref.T
    ad, bd, sd = _dirty(a), _dirty(b), _dirty(s)
    kept = [t.bits.clone() for t in (ad, bd, sd)]
    assert torch.equal(xnor_matmul(ad, bd, backend=backend), xnor)
    assert torch.equal(spike_matmul(sd, bd, backend=backend), spike)
    assert bool(xnor_matmul(ad, bd, backend=backend).abs().le(k).all())
    torch.testing.assert_close(binary_linear(x, bd, backend=backend), lin, rtol=0, atol=0)
    # the caller's words are read, never cleaned in place
    assert all(torch.equal(t.bits, c) for t, c in zip((ad, bd, sd), kept))


@pytest.mark.parametrize("backend", backend_params("binary_conv2d"))
def test_conv_padding_bits_set_after_packing_never_count(backend, seed):
    w = torch.randn(5, 3, 3, 3)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    packed = pack_signs(w.flatten(1))  # K = 27: 5 padding bits per row
    ref = torch.nn.functional.conv2d(torch.where(x >= 0, 1.0, -1.0).double(),
                                     torch.where(w >= 0, 1.0, -1.0).double(), padding=1)
    out = binary_conv2d(x, _dirty(packed), 3, padding=1, backend=backend)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- IF thresholds

LOW = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", backend_params("if_multistep"))
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("thr, reset, match", [
    (1e39, None, r"^v_threshold=1e\+39 is outside the finite range of float32"),
    (3.5e38, -0.5, r"^v_threshold=3.5e\+38 is outside the finite range of float32"),
    (1.0, -1e39, r"^v_reset=-1e\+39 is outside the finite range of float32"),
    (1e-50, None, r"^v_threshold=1e-50 rounds to 0 in float32"),
    (0.7000000001, 0.7, r"^v_reset must be below v_threshold in float32"),
], ids=["thr-big", "thr-just-big", "reset-big", "thr-tiny", "reset-rounds-to-thr"])
def test_if_threshold_beyond_state_range_raises(backend, dtype, thr, reset, match):
    """Every backend computes in float32 state for these inputs: a value that is not a finite,
    distinct float32 there raises (before, cpu gave no spikes and the reference NaN or an error)."""
    x = torch.randn(3, 4).to(dtype)
    with pytest.raises(ValueError, match=match) as info:
        if_multistep(x, thr, reset, backend=backend)
    assert str(dtype).replace("torch.", "") in str(info.value)


@pytest.mark.parametrize("backend", backend_params("if_multistep"))
def test_if_extreme_thresholds_all_backends_agree(backend, seed):
    """Where the state dtype holds them, extreme thresholds and resets are valid and every backend
    equals the reference: float64 state with 1e39, float32 with its largest finite values."""
    x64 = torch.randn(5, 7, dtype=torch.float64) * 1e39
    x32 = torch.randn(5, 7) * 1e38
    fmax = torch.finfo(torch.float32).max
    for x, thr, reset in ((x64, 1e39, None), (x64, 1e39, -1e39), (x32, fmax, None),
                          (x32, fmax, -fmax), (torch.randn(5, 7), 1e-44, None)):
        s, v = if_multistep(x, thr, reset, return_v=True, backend=backend)
        rs, rv = if_multistep(x, thr, reset, return_v=True, backend="reference")
        # (float32 potentials near the max may overflow to inf, then NaN: the same everywhere)
        torch.testing.assert_close(s, rs, rtol=0, atol=0, equal_nan=True, msg=str((thr, reset)))
        torch.testing.assert_close(v, rv, rtol=0, atol=0, equal_nan=True, msg=str((thr, reset)))


def test_if_threshold_limit_is_the_float32_max():
    x = torch.randn(2, 3)
    fmax = torch.finfo(torch.float32).max
    if_multistep(x, fmax, backend="reference")
    with pytest.raises(ValueError, match="outside the finite range"):
        if_multistep(x, math.nextafter(fmax, math.inf) * 1.0000001, backend="reference")
