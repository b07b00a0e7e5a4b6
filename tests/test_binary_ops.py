"""Binary ops: every backend against definitions that never look at the packed bits.

The ground truth is plain float64 torch on the +-1 (or 0/1) tensors: ``sign(x) @ sign(y).T`` and
``conv2d(sign(x), sign(W))`` with zero padding. Integer results must be equal, float results equal
after the same ``* scale + bias`` (the interpreter's bf16/fp16 downcast truncates: 1 ulp there).
K covers 1, 31, 32, 33 (word boundaries) and 4096 + 7; M or N = 1; inputs are fresh random draws
each run (the ``seed`` fixture prints the seed). Triton runs in the interpreter on CPU (tiny shapes).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from kdengine import _dispatch, testing
from kdengine.ops.binary import (
    PackedSigns,
    binary_conv2d,
    binary_linear,
    pack_signs,
    pack_spikes,
    spike_matmul,
    xnor_matmul,
)
from tests.backend_params import backend_params

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KS = [1, 31, 32, 33, 4096 + 7]
MN = [(1, 1), (1, 7), (6, 1), (9, 13)]


def _params(op: str) -> list:
    out = []
    for dev in DEVICES:
        for p in backend_params(op, dev):
            out.append(pytest.param(p.values[0], dev, marks=p.marks, id=f"{p.id}-{dev}"))
    return out


def _pm1(x: torch.Tensor) -> torch.Tensor:
    """The sign convention, spelled out independently of the packers: x >= 0 -> +1."""
    return torch.where(x < 0, -1.0, 1.0).to(torch.float64)


def _randn(*shape, dtype=torch.float32, device="cpu"):
    x = torch.randn(*shape, dtype=torch.float64)
    x[torch.rand(*shape) < 0.05] = 0.0  # exact zeros (+1) must be common enough to matter
    return x.to(dtype).to(device)


def _close_float(actual, expected, dtype, backend, device):
    assert actual.dtype == expected.dtype == dtype
    if dtype in (torch.float16, torch.bfloat16) and backend == "triton" or device == "cuda":
        # interpreter downcasts truncate; GPU compilers may contract * + into an FMA
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(actual.double(), expected.double(), rtol=2 * eps, atol=0)
    else:
        assert torch.equal(actual, expected), (actual - expected).abs().max()


# --------------------------------------------------------------------------- packing


def test_pack_layout_bit_order_and_sign_convention():
    """Bit j of word w is element 32w + j; bit 1 = -1; +0.0 and -0.0 are +1; padding is 0."""
    x = torch.ones(2, 33)
    x[0, 0] = -1.0
    x[0, 31] = -2.5
    x[0, 32] = -0.5
    x[1, 5] = -0.0
    x[1, 6] = 0.0
    x[1, 7] = -1e-30
    p = pack_signs(x, backend="reference")
    assert p.bits.dtype == torch.int32 and p.bits.shape == (2, 2) and p.k == 33 and p.shape == (2, 33)
    words = p.bits.to(torch.int64) & 0xFFFFFFFF
    assert words.tolist() == [[1 | (1 << 31), 1], [1 << 7, 0]]
    assert torch.equal(p.unpack(torch.float64), _pm1(x))


@pytest.mark.parametrize("backend,device", _params("binary_pack"))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_pack_signs_matches_reference(backend, device, k, dtype, seed):
    x = _randn(3, 2, k, dtype=dtype, device=device)
    x[0, 0, 0] = -0.0
    p = pack_signs(x, backend=backend)
    r = pack_signs(x.cpu(), backend="reference")
    assert p.bits.shape == (3, 2, (k + 31) // 32) and p.k == k and not p.spikes
    assert torch.equal(p.bits.cpu(), r.bits)
    assert torch.equal(p.unpack(torch.float64).cpu(), _pm1(x.cpu()))


@pytest.mark.parametrize("backend,device", _params("binary_pack"))
@pytest.mark.parametrize("k", [1, 33, 4096 + 7])
@pytest.mark.parametrize("kind", ["bool", "float", "int"])
def test_pack_spikes_matches_reference(backend, device, k, kind, seed):
    s = torch.rand(4, k) < 0.3
    sv = {"bool": s, "float": s.float(), "int": s.to(torch.int64)}[kind].to(device)
    p = pack_spikes(sv, backend=backend)
    assert p.spikes and p.k == k
    assert torch.equal(p.bits.cpu(), pack_spikes(s, backend="reference").bits)
    assert torch.equal(p.unpack(torch.float64).cpu(), s.double())


def test_packed_signs_to_and_empty_rows():
    p = pack_signs(torch.randn(0, 40))
    assert p.bits.shape == (0, 2) and p.shape == (0, 40)
    q = pack_signs(torch.randn(3, 40)).to("cpu")
    assert isinstance(q, PackedSigns) and q.k == 40


# --------------------------------------------------------------------------- matmuls


@pytest.mark.parametrize("backend,device", _params("xnor_matmul"))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("mn", MN, ids=str)
def test_xnor_matmul_exact(backend, device, k, mn, seed):
    m, n = mn
    x, y = _randn(m, k), _randn(n, k)
    a, b = pack_signs(x).to(device), pack_signs(y).to(device)
    out = xnor_matmul(a, b, backend=backend)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    expected = torch.round(_pm1(x) @ _pm1(y).T).to(torch.int32)
    assert torch.equal(out.cpu(), expected), f"seed={seed}"


@pytest.mark.parametrize("backend,device", _params("spike_matmul"))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("mn", MN, ids=str)
def test_spike_matmul_exact(backend, device, k, mn, seed):
    m, n = mn
    rate = float(torch.rand(()))  # includes nearly silent and nearly saturated rows
    s = (torch.rand(m, k) < rate).float()
    y = _randn(n, k)
    out = spike_matmul(pack_spikes(s).to(device), pack_signs(y).to(device), backend=backend)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    expected = torch.round(s.double() @ _pm1(y).T).to(torch.int32)
    assert torch.equal(out.cpu(), expected), f"seed={seed}"


@pytest.mark.parametrize("backend,device", _params("xnor_matmul"))
def test_xnor_matmul_extremes_and_leading_dims(backend, device):
    """All-equal rows give +K, opposite rows -K; a (..., K) left operand keeps its leading dims."""
    k = 70
    x = torch.ones(2, 3, k)
    x[1] = -1.0
    a = pack_signs(x).to(device)
    b = pack_signs(torch.ones(4, k)).to(device)
    out = xnor_matmul(a, b, backend=backend).cpu()
    assert out.shape == (2, 3, 4)
    assert (out[0] == k).all() and (out[1] == -k).all()


cpu_only = pytest.mark.skipif(
    not _dispatch.backend_availability("cpu", "cpu").available,
    reason=f"cpu: {_dispatch.backend_availability('cpu', 'cpu').reason}",
)


@contextlib.contextmanager
def _isa_or_skip(isa):
    try:
        old = testing.set_binary_isa(isa)
    except ValueError as exc:  # this CPU lacks the instruction set
        pytest.skip(str(exc))
    try:
        yield
    finally:
        testing.set_binary_isa(old)


def _check_native_gemm(ops, isa, mode, mnk, seed):
    m, n, k = mnk
    x = (torch.rand(m, k) < 0.4).float() if mode == 1 else _randn(m, k)
    y = _randn(n, k)
    a = pack_spikes(x) if mode == 1 else pack_signs(x)
    b = pack_signs(y)
    lhs = x.double() if mode == 1 else _pm1(x)
    expected = torch.round(lhs @ _pm1(y).T).to(torch.int32)
    with _isa_or_skip(isa):
        out = ops.binary_gemm(a.bits, b.bits, k, mode)
        packed = ops.binary_pack_signs(x) if mode == 0 else ops.binary_pack_bool(x.bool())
    assert torch.equal(out, expected), f"seed={seed}"
    assert torch.equal(packed, a.bits)


@cpu_only
@pytest.mark.parametrize(
    "isa,split_b_rows,lut_min",
    [(0, None, None), (1, None, None), (2, 1, 1 << 40), (2, 1 << 40, 1 << 40), (2, 1 << 40, 1),
     (3, 1, 1 << 40), (3, 1 << 40, 1 << 40)],
    ids=["portable", "popcnt", "avx2-panels", "avx2-rawB", "avx2-lut", "avx512-panels", "avx512-rawB"],
)
@pytest.mark.parametrize("mode", [0, 1], ids=["xnor", "spike"])
@pytest.mark.parametrize(
    "mnk", [(70, 131, 75), (3, 5, 2 * 8192 + 40), (1, 257, 4096 + 7), (130, 520, 1800 + 3),
            (101, 1, 509), (7, 97, 1021), (193, 37, 512 + 31)], ids=str
)
def test_cpu_every_isa_and_blocking_path(isa, split_b_rows, lut_min, mode, mnk, seed):
    """Each code path of csrc/binary/xnor*.cpp (portable, POPCNT, AVX2 with packed panels of both
    operands, with raw B rows, or the table-lookup GEMM of xnor_lut.cpp; AVX-512 VPOPCNTDQ with B
    transposed into 32-row panels or with raw B rows; forced whatever M and N are; skipped where
    the CPU lacks the instruction set), with edge tiles, several tasks (M > 64 and > 96, N > 128
    and > 256), N = 1, primes, K not a multiple of 64 or 512 bits, an odd word count, and several
    K blocks (K > 7936 bits; > 56 words for the lookup path) with a partial last vector. Every
    path must give the exact integer product, so they are bit-identical to each other too."""
    from kdengine import _native

    ops = _native.ops("cpu")
    if split_b_rows is None:
        _check_native_gemm(ops, isa, mode, mnk, seed)
        return
    with testing.binary_split_b_rows(split_b_rows), testing.binary_lut_min(lut_min, lut_min):
        _check_native_gemm(ops, isa, mode, mnk, seed)


@cpu_only
@pytest.mark.parametrize("mode", [0, 1], ids=["xnor", "spike"])
def test_cpu_lut_gemm_16bit_superblocks(mode, seed):
    """K > 2044 words (65,408 bits): the lookup GEMM's 16-bit counters are flushed to int32 between
    super-blocks; rows of all-ones against all-ones reach the largest counts."""
    from kdengine import _native

    ops = _native.ops("cpu")
    k = 2044 * 32 * 2 + 77
    a = torch.randn(3, k)
    a[0] = -1.0  # all bits set: popcount(a XOR b) or (a AND b) is maximal against row 0 of b
    b = torch.randn(70, k)
    b[0] = -1.0 if mode == 1 else 1.0
    if mode == 0:
        pa, pb = pack_signs(a), pack_signs(b)
        expected = torch.round(_pm1(a) @ _pm1(b).T).to(torch.int32)
    else:
        s = (a < 0).float()
        pa, pb = pack_spikes(s), pack_signs(b)
        expected = torch.round(s.double() @ _pm1(b).T).to(torch.int32)
    with _isa_or_skip(testing.ISA_AVX2), testing.binary_lut_min(1, 1):
        out = ops.binary_gemm(pa.bits, pb.bits, k, mode)
    assert torch.equal(out, expected)
    assert abs(int(out[0, 0])) == k


@cpu_only
@pytest.mark.parametrize("isa", [0, 1, 2, 3], ids=["portable", "popcnt", "avx2", "avx512"])
def test_cpu_ops_through_every_isa(isa, seed):
    """binary_linear (batch 1 and 40 rows), spike_matmul and binary_conv2d with each instruction
    set forced (skipped where the CPU lacks it) give the exact integer results of the definition."""
    k, n = 509, 67
    w = _randn(n, k)
    wp = pack_signs(w)
    scale = torch.rand(n) + 0.5
    s = (torch.rand(40, k) < 0.3).float()
    xc, wc = _randn(2, 5, 7, 9), _randn(33, 5, 3, 3)
    with _isa_or_skip(isa):
        for rows in (1, 40):
            x = _randn(rows, k)
            y = binary_linear(x, wp, scale, backend="cpu")
            exact = torch.round(_pm1(x) @ _pm1(w).T)
            assert torch.equal(y, (exact.float() * scale).float()), f"rows={rows} seed={seed}"
        out = spike_matmul(pack_spikes(s), wp, backend="cpu")
        assert torch.equal(out, torch.round(s.double() @ _pm1(w).T).to(out.dtype))
        yc = binary_conv2d(xc, pack_signs(wc.flatten(1)), 3, padding=1, backend="cpu")
        assert torch.equal(yc, torch.round(F.conv2d(_pm1(xc), _pm1(wc), padding=1)).float())


# --------------------------------------------------------------------------- binary linear


@pytest.mark.parametrize("backend,device", _params("binary_linear"))
@pytest.mark.parametrize("k", [1, 33, 4096 + 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", ["none", "scale", "scale_bias", "bias"])
def test_binary_linear_matches_definition(backend, device, k, dtype, affine, seed):
    n = 5
    x = _randn(2, 3, k, dtype=dtype)
    w = _randn(n, k)
    scale = torch.rand(n) + 0.1 if "scale" in affine else None
    bias = torch.randn(n) if "bias" in affine else None
    y = binary_linear(
        x.to(device), pack_signs(w).to(device),
        None if scale is None else scale.to(device), None if bias is None else bias.to(device),
        backend=backend,
    )
    assert y.shape == (2, 3, n) and not y.requires_grad
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    dot = torch.round(_pm1(x.float()) @ _pm1(w).T).to(ct)  # exact integers
    if scale is not None:
        dot = dot * scale.to(ct)
    if bias is not None:
        dot = dot + bias.to(ct)
    _close_float(y.cpu(), dot.to(dtype), dtype, backend, device)


@pytest.mark.parametrize("backend,device", _params("binary_linear"))
def test_binary_linear_batch_one_and_no_grad(backend, device, seed):
    k, n = 300, 1
    x = _randn(1, k, device=device).requires_grad_(True)
    w = pack_signs(_randn(n, k)).to(device)
    y = binary_linear(x, w, backend=backend)
    assert not y.requires_grad and y.shape == (1, 1)
    assert float(y) == float(torch.round(_pm1(x.detach().cpu()) @ w.unpack(torch.float64).cpu().T))


# --------------------------------------------------------------------------- binary conv2d

CONV_CASES = [
    # (C, H, W, O, kernel, stride, padding, dilation)
    (3, 7, 6, 4, (3, 3), 1, 1, 1),
    (2, 9, 8, 3, (3, 2), (2, 1), (2, 1), (1, 2)),
    (5, 6, 6, 2, (1, 1), 1, 0, 1),
    (1, 4, 5, 3, (3, 3), 2, 3, 2),  # padding wider than the kernel reach: some outputs all-padding
    (7, 5, 5, 6, (5, 5), 1, 2, 1),  # K = 175 spans 6 words
]


@pytest.mark.parametrize("backend,device", _params("binary_conv2d"))
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_binary_conv2d_zero_padding_exact(backend, device, case, seed):
    c, h, wd, o, ks, stride, padding, dilation = case
    x = _randn(2, c, h, wd)
    w = _randn(o, c, *ks)
    scale, bias = torch.rand(o) + 0.5, torch.randn(o)
    y = binary_conv2d(
        x.to(device), pack_signs(w.flatten(1)).to(device), ks, scale.to(device), bias.to(device),
        stride=stride, padding=padding, dilation=dilation, backend=backend,
    )
    dot = F.conv2d(_pm1(x), _pm1(w), stride=stride, padding=padding, dilation=dilation)
    expected = (torch.round(dot).float() * scale[:, None, None] + bias[:, None, None])
    assert y.shape == expected.shape and y.is_contiguous()
    _close_float(y.cpu(), expected, torch.float32, backend, device)
    # without scale/bias the result is the exact integer conv (zero padding contributes 0)
    y0 = binary_conv2d(x.to(device), pack_signs(w.flatten(1)).to(device), ks, stride=stride,
                       padding=padding, dilation=dilation, backend=backend)
    assert torch.equal(y0.cpu(), torch.round(dot).float())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend,device", _params("binary_linear"))
def test_nan_raises_naming_x(backend, device):
    x = torch.randn(2, 40, device=device)
    x[1, 7] = float("nan")
    w = pack_signs(torch.randn(3, 40)).to(device)
    with pytest.raises(ValueError, match="x contains NaN"):
        binary_linear(x, w, backend=backend)
    with pytest.raises(ValueError, match="x contains NaN"):
        pack_signs(x, backend=backend)
    with pytest.raises(ValueError, match="x contains NaN"):
        binary_conv2d(x.reshape(1, 2, 4, 10), pack_signs(torch.randn(3, 2 * 3 * 3)).to(device),
                      3, backend=backend)


def test_bad_inputs_raise_clear_errors():
    a = pack_signs(torch.randn(3, 40))
    b = pack_signs(torch.randn(4, 41))
    with pytest.raises(ValueError, match="K mismatch"):
        xnor_matmul(a, b)
    with pytest.raises(ValueError, match="K mismatch"):
        binary_linear(torch.randn(2, 41), a)
    with pytest.raises(ValueError, match="K mismatch"):
        binary_conv2d(torch.randn(1, 2, 5, 5), a, 3)  # 2*3*3 = 18 != 40
    with pytest.raises(TypeError, match="floating"):
        pack_signs(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        binary_linear(torch.ones(2, 40, dtype=torch.int32), a)
    with pytest.raises(ValueError, match="K >= 1"):
        pack_signs(torch.randn(3, 0))
    with pytest.raises(ValueError, match="K >= 1"):
        binary_linear(torch.randn(3, 0), a)
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_spikes(torch.tensor([[0.0, 1.0, 0.5]]))
    with pytest.raises(TypeError, match="PackedSigns"):
        xnor_matmul(a, torch.zeros(4, 2, dtype=torch.int32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="signs"):
        spike_matmul(pack_spikes(torch.ones(2, 40)), pack_spikes(torch.ones(3, 40)))
    with pytest.raises(ValueError, match="spikes"):
        spike_matmul(a, a)
    with pytest.raises(ValueError, match=r"scale must have shape \(3,\)"):
        binary_linear(torch.randn(2, 40), a, scale=torch.ones(4))
    with pytest.raises(ValueError, match="stride"):
        binary_conv2d(torch.randn(1, 2, 5, 5), pack_signs(torch.randn(3, 18)), 3, stride=0)
    with pytest.raises(ValueError, match="does not fit"):
        binary_conv2d(torch.randn(1, 2, 2, 2), pack_signs(torch.randn(3, 18)), 3)
    with pytest.raises(ValueError, match="backend"):
        xnor_matmul(a, a, backend="gpu")


def test_packed_signs_validation():
    with pytest.raises(TypeError, match="int32"):
        PackedSigns(torch.zeros(2, 2), 40)
    with pytest.raises(ValueError, match=r"ceil\(k/32\)"):
        PackedSigns(torch.zeros(2, 3, dtype=torch.int32), 40)
    with pytest.raises(ValueError, match="k must be >= 1"):
        PackedSigns(torch.zeros(2, 0, dtype=torch.int32), 0)
    bits = torch.zeros(2, 2, dtype=torch.int32)
    bits[1, 1] = 1 << 8  # element 40 of a K = 40 row: a padding bit
    with pytest.raises(ValueError, match="padding bits"):
        PackedSigns(bits, 40)
    bits[1, 1] = 1 << 7  # element 39: valid
    assert PackedSigns(bits, 40).unpack()[1, 39] == -1
    full = torch.full((1, 1), -1, dtype=torch.int32)  # K = 32: no padding, all bits valid
    assert (PackedSigns(full, 32).unpack() == -1).all()


@cpu_only
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_conv_words_equal_python_im2col(layout, dtype, seed):
    """csrc/binary/conv_words.cpp (one pass) gives the same im2col words as the Python path (pack per
    pixel, pad with +1 words, unfold) for random geometries, channel counts around word edges,
    exact zeros and -0.0, and any memory layout."""
    from kdengine.ops.binary import ConvGeometry, channel_words

    g = torch.Generator().manual_seed(seed)
    for _ in range(12):
        r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
        c = [1, 7, 8, 31, 32, 33, 70][r(0, 6)]
        geo = ConvGeometry(r(1, 3), c, r(1, 9), r(1, 9), kernel=(r(1, 3), r(1, 3)),
                           stride=(r(1, 2), r(1, 2)), padding=(r(0, 2), r(0, 2)),
                           dilation=(r(1, 2), r(1, 2)))
        if min(geo.out_hw) < 1:
            continue
        x = torch.randn(geo.batch, c, geo.height, geo.width, generator=g)
        x[x.abs() < 0.1] = 0.0
        x[x.abs() < 0.12] = -0.0
        x = x.to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = torch.cat([x, x], dim=3)[..., ::2]
        assert torch.equal(channel_words(x, geo, "cpu"), channel_words(x, geo, "reference"))


@cpu_only
def test_cpu_conv_words_nan_raises():
    from kdengine.ops.binary import ConvGeometry, channel_words

    for c in (3, 12):
        x = torch.randn(1, c, 5, 5)
        x[0, c - 1, 2, 2] = float("nan")
        geo = ConvGeometry(1, c, 5, 5, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
        with pytest.raises(ValueError, match="NaN"):
            channel_words(x, geo, "cpu")


@cpu_only
def test_conv_plan_cache_reuses_and_notices_weight_changes(seed):
    """binary_conv2d keeps the repacked weights of recent (weights, geometry) pairs: the same
    weights hit (any batch size), weights changed in place miss, and results stay exact."""
    from kdengine.ops import binary as bops

    w = pack_signs(_randn(6, 5 * 9))
    x = _randn(2, 5, 7, 8)
    out1 = bops.binary_conv2d(x, w, 3, padding=1, backend="cpu")
    geo = bops.ConvGeometry(*x.shape, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    plan = bops.conv_plan(w.bits, geo, "cpu")
    assert bops.conv_plan(w.bits, geo, "cpu") is plan
    x3 = _randn(3, 5, 7, 8)  # another batch size: the same plan
    assert bops.conv_plan(w.bits, bops.ConvGeometry(*x3.shape, kernel=(3, 3), stride=(1, 1),
                                                    padding=(1, 1), dilation=(1, 1)), "cpu") is plan
    ref_out = bops.binary_conv2d(x, w, 3, padding=1, backend="reference")
    assert torch.equal(out1, ref_out)
    w.bits.bitwise_xor_(1)  # flip bit 0 of every row in place: the plan must not be reused
    assert bops.conv_plan(w.bits, geo, "cpu") is not plan
    assert torch.equal(bops.binary_conv2d(x, w, 3, padding=1, backend="cpu"),
                       bops.binary_conv2d(x, w, 3, padding=1, backend="reference"))
