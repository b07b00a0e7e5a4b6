"""Binary layers with thresholded packed output: int32 counts -> packed signs, no float between.

The oracle is the float path spelled out here: the exact integer count, ``* scale + bias`` in the
compute dtype (two roundings), rounded to the output dtype, then ``x < 0``. Every count in
``[-k, k]`` is checked for the thresholds; every backend of every op against that oracle with odd
sizes (channels 1, 31, 33, 65; prime H/W; stride, padding, dilation), zero / negative / extreme
scales and exact ties; and a small binary conv net through the runtime's packed-to-packed plan
against its float forward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdengine.infer.runtime import InferenceModel
from kdengine.nn import BinaryConv2d, BinaryLinear, PackedBinaryConv2d, pack_model
from kdengine.ops.binary import (
    PackedSigns,
    binary_conv2d,
    pack_channels,
    pack_signs,
    sign_thresholds,
    threshold_pack,
    unpack_channels,
    xnor_matmul,
    xnor_matmul_signs,
)
from kdengine.ops.binary.threshold import threshold_table
from tests.backend_params import backend_params


def _float_bits(v: torch.Tensor, scale, bias, ct=torch.float32, out=None) -> torch.Tensor:
    """The float path's sign bit of exact counts ``v`` (..., N): True = negative."""
    y = v.to(ct)
    if scale is not None:
        y = y * scale.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(out or ct) < 0


def _scales(n: int) -> torch.Tensor:
    """Ordinary, zero (both signs), negative, tiny and huge scales."""
    s = torch.randn(n)
    extremes = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, 1e-45, 1.0, -1.0])
    s[: min(n, len(extremes))] = extremes[: min(n, len(extremes))]
    return s


def _biases(scale: torch.Tensor, k: int) -> torch.Tensor:
    """Random biases, a third of them exact ties (-scale * count for an achievable count)."""
    b = torch.randn(scale.shape[0]) * k ** 0.5
    tie = torch.rand(scale.shape[0]) < 0.33
    c = torch.randint(-k, k + 1, scale.shape).to(torch.float32)
    t = -(c * scale)
    return torch.where(tie & torch.isfinite(t), t, b)


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("k", [1, 2, 31, 33, 65, 577])
@pytest.mark.parametrize("out", [torch.float32, torch.float16, torch.bfloat16])
def test_thresholds_equal_the_float_sign_for_every_count(seed, k, out):
    n = 40
    scale = _scales(n)
    bias = _biases(scale, k)
    th = sign_thresholds(scale, bias, k, out_dtype=out)
    v = torch.arange(-k, k + 1)[:, None].expand(-1, n)
    assert torch.equal(th.bits_of(v), _float_bits(v, scale, bias, out=out))
    # and shifted by a per-pixel correction: raw counts c = v + sub
    sub = torch.randint(-50, 50, (3, n), dtype=torch.int32)
    table, flip = threshold_table(th, sub)
    for p in range(3):
        c = v + sub[p]
        got = torch.where(flip, -c, c) <= table[p].to(torch.int64)
        assert torch.equal(got, th.bits_of(v))


def test_thresholds_float64_scale_none_and_post(seed):
    k, n = 97, 17
    scale = _scales(n).double()
    bias = _biases(scale.float(), k).double()
    th = sign_thresholds(scale, bias, k, compute_dtype=torch.float64)
    v = torch.arange(-k, k + 1)[:, None].expand(-1, n)
    assert torch.equal(th.bits_of(v), _float_bits(v, scale, bias, torch.float64))
    th = sign_thresholds(None, None, k, channels=3)
    v3 = torch.arange(-k, k + 1)[:, None].expand(-1, 3)
    assert torch.equal(th.bits_of(v3), v3 < 0)  # the count itself; 0 is +1
    # a monotone post-op with negative gains (a batch norm) folded in
    bn = nn.BatchNorm1d(n).eval()
    with torch.no_grad():
        bn.weight.normal_()
        bn.running_mean.normal_(0, 5)
    th = sign_thresholds(scale.float(), bias.float(), k, post=bn)
    with torch.no_grad():
        want = bn(v.to(torch.float32) * scale.float() + bias.float()) < 0
    assert torch.equal(th.bits_of(v), want)


def test_thresholds_validation():
    with pytest.raises(ValueError, match="scale must be finite"):
        sign_thresholds(torch.tensor([float("nan")]), None, 3)
    with pytest.raises(ValueError, match="bias must be finite"):
        sign_thresholds(None, torch.tensor([float("inf")]), 3)
    with pytest.raises(ValueError, match="channels"):
        sign_thresholds(None, None, 3)
    with pytest.raises(ValueError, match="k must be"):
        sign_thresholds(torch.ones(2), None, 0)
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        sign_thresholds(torch.ones(2), torch.ones(3), 4)


# --------------------------------------------------------------------------- threshold_pack / xnor_matmul_signs


@pytest.mark.parametrize("backend", backend_params("binary_threshold_pack"))
@pytest.mark.parametrize("m,n", [(1, 1), (7, 31), (5, 33), (3, 65), (13, 64)])
def test_threshold_pack_backends(seed, backend, m, n):
    k = 50
    scale, v = _scales(n), torch.randint(-k, k + 1, (m, n), dtype=torch.int32)
    bias = _biases(scale, k)
    th = sign_thresholds(scale, bias, k)
    got = threshold_pack(v, th, backend=backend)
    assert isinstance(got, PackedSigns) and got.shape == (m, n)
    assert torch.equal(got.bits, pack_signs(torch.where(_float_bits(v, scale, bias), -1.0, 1.0)).bits)
    with pytest.raises(ValueError, match=r"counts must have shape \(\.\.\., "):
        threshold_pack(v[:, :0], th, backend=backend)
    with pytest.raises(TypeError, match="int32"):
        threshold_pack(v.float(), th, backend=backend)


@pytest.mark.parametrize("backend", backend_params("xnor_signs"))
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (9, 31, 33), (70, 65, 31), (300, 33, 97)])
def test_xnor_matmul_signs_backends(seed, backend, m, n, k):
    a, b = pack_signs(torch.randn(m, k)), pack_signs(torch.randn(n, k))
    scale = _scales(n)
    bias = _biases(scale, k)
    got = xnor_matmul_signs(a, b, scale, bias, backend=backend)
    dot = xnor_matmul(a, b, backend="reference")
    assert got.shape == (m, n)
    assert torch.equal(got.bits, pack_signs(torch.where(_float_bits(dot, scale, bias), -1.0, 1.0)).bits)


# --------------------------------------------------------------------------- conv with packed output

CONV_CASES = [  # C, O, H, W, kernel, stride, padding, dilation
    (1, 1, 5, 7, 3, 1, 1, 1),
    (31, 33, 7, 5, 3, (2, 1), (1, 0), (1, 2)),
    (33, 65, 11, 13, (3, 2), 1, 2, 1),
    (65, 31, 5, 3, 1, 1, 0, 1),
]


def _conv_bits_oracle(x, w, case, scale, bias, out_dtype):
    c, o, h, wd, kern, stride, pad, dil = case
    kh, kw = (kern, kern) if isinstance(kern, int) else kern
    sx = torch.where(x < 0, -1.0, 1.0).double()
    dot = F.conv2d(sx, w.unpack(torch.float64).view(o, c, kh, kw), None, stride, pad, dil).round()
    ct = torch.float64 if out_dtype == torch.float64 else torch.float32
    neg = _float_bits(dot.permute(0, 2, 3, 1), scale, bias, ct, out_dtype)
    return pack_signs(torch.where(neg, -1.0, 1.0)).bits


@pytest.mark.parametrize("backend", backend_params("binary_conv2d_signs"))
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_packed_output_backends(seed, backend, case, dtype):
    c, o, h, wd, kern, stride, pad, dil = case
    kh, kw = (kern, kern) if isinstance(kern, int) else kern
    x = torch.randn(2, c, h, wd).to(dtype)
    w = pack_signs(torch.randn(o, c * kh * kw))
    k = c * kh * kw
    scale = _scales(o)
    bias = _biases(scale, k)
    got = binary_conv2d(x, w, kern, scale, bias, stride, pad, dil, packed_output=True, backend=backend)
    assert isinstance(got, PackedSigns) and got.bits.dtype == torch.int32
    assert torch.equal(got.bits, _conv_bits_oracle(x, w, case, scale, bias, dtype))
    # packed input: the same words from channel words
    xp = pack_channels(x)
    again = binary_conv2d(xp, w, kern, scale, bias, stride, pad, dil, packed_output=True, backend=backend)
    if dtype == torch.float32:
        assert torch.equal(again.bits, got.bits)
    # the float output from packed input equals the float output from x
    y = binary_conv2d(xp, w, kern, scale, bias, stride, pad, dil, backend=backend)
    assert torch.equal(y, binary_conv2d(x.float(), w, kern, scale, bias, stride, pad, dil, backend="reference"))


@pytest.mark.parametrize("backend", backend_params("binary_conv2d"))
def test_packed_input_ignores_edited_padding_bits(seed, backend):
    x = torch.randn(1, 33, 5, 7)
    w = pack_signs(torch.randn(4, 33 * 9))
    xp = pack_channels(x)
    dirty = xp.bits.clone()
    dirty[..., -1] |= -2  # bits 1..31 of the last word: channel padding
    y = binary_conv2d(PackedSigns._trusted(dirty, 33), w, 3, padding=1, backend=backend)
    assert torch.equal(y, binary_conv2d(x, w, 3, padding=1, backend="reference"))


def test_packed_conv_validation():
    w = pack_signs(torch.randn(4, 27))
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match="scale must be finite"):
        binary_conv2d(x, w, 3, torch.tensor([1.0, float("nan"), 1.0, 1.0]), packed_output=True)
    with pytest.raises(ValueError, match=r"logical shape \(B, H, W, C\)"):
        binary_conv2d(pack_signs(torch.randn(5, 3)), w, 3)
    with pytest.raises(ValueError, match="packed x must hold|signs"):
        binary_conv2d(PackedSigns(torch.zeros(1, 5, 5, 1, dtype=torch.int32), 3, spikes=True), w, 3)
    with pytest.raises(ValueError, match="K mismatch"):
        binary_conv2d(pack_channels(torch.randn(1, 4, 5, 5)), w, 3)


# --------------------------------------------------------------------------- layers and the runtime


def _bn(c: int, positive: bool = False) -> nn.BatchNorm2d:
    m = nn.BatchNorm2d(c)
    with torch.no_grad():
        m.weight.normal_()
        if positive:
            m.weight.abs_()
        m.bias.normal_(0, 0.5)
        m.running_mean.normal_(0, 3)
        m.running_var.uniform_(0.5, 4)
    return m.eval()


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 33, 3, padding=1), _bn(33), nn.Hardtanh(),
        BinaryConv2d(33, 65, 3, padding=1, mode="both", bias=True), _bn(65), nn.MaxPool2d(2),
        BinaryConv2d(65, 65, 3, padding=(1, 2), dilation=(1, 2), groups=5, mode="both"), _bn(65),
        nn.Hardtanh(), nn.Dropout(),
        BinaryConv2d(65, 31, 3, stride=2, mode="both"), nn.MaxPool2d(2, padding=1), _bn(31, positive=True),
        BinaryConv2d(31, 7, 1, mode="both"), nn.Flatten(), nn.Linear(7 * 3 * 2, 10),
    ).eval()


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.slow)])
def test_runtime_packed_chain_equals_float_forward(seed, backend):
    """A small binary conv net: the runtime chains every XNOR conv packed-to-packed (BN, hardtanh,
    dropout folded into thresholds, max-pools on words), and its output equals the float forward
    of the training model and of the packed model bit for bit."""
    if backend not in [p.values[0] for p in backend_params("binary_conv2d_signs") if not p.marks]:
        pytest.skip(f"{backend} cannot run here")
    model = _net()
    x = torch.randn(3, 3, 19, 17)
    packed = pack_model(model, backend=backend)
    want = model(x)
    assert torch.equal(packed(x), want)
    im = InferenceModel(packed)
    assert torch.equal(im.predict(x), want)
    steps = [s["step"] for s in im.plan_summary(x)["steps"]]
    assert sum("thresholded to packed channel words" in s for s in steps) == 3
    assert sum(s.startswith("max-pool on packed channel words") for s in steps) == 2
    assert sum(s.startswith("folded into") for s in steps) == 5


def test_runtime_does_not_chain_through_unsupported_leaves():
    """A negative-scale batch norm after the pool does not commute with it: no chain there."""
    model = nn.Sequential(BinaryConv2d(4, 8, 3, padding=1, mode="both"), nn.MaxPool2d(2), _bn(8),
                          BinaryConv2d(8, 4, 3, mode="both")).eval()
    with torch.no_grad():
        model[2].weight[0] = -1.0
    packed = pack_model(model)
    x = torch.randn(2, 4, 10, 10)
    im = InferenceModel(packed)
    steps = [s["step"] for s in im.plan_summary(x)["steps"]]
    assert not any("packed channel words" in s for s in steps)
    assert torch.equal(im.predict(x), model(x))


def test_layer_packed_output_attribute(seed):
    layer = BinaryConv2d(33, 40, 3, padding=1, mode="both", bias=True)
    p = pack_model(layer)
    x = torch.randn(2, 33, 7, 5)
    y = p(x)
    p.packed_output = True
    bits = p(x)
    assert isinstance(bits, PackedSigns) and bits.shape == (2, 7, 5, 40)
    assert torch.equal(bits.bits, pack_channels(y).bits)
    p2 = PackedBinaryConv2d(40, 3, 3, mode="both")
    assert torch.equal(p2(bits), p2(unpack_channels(bits)))
    lin = pack_model(BinaryLinear(65, 33, mode="both", bias=True))
    xl = torch.randn(4, 65)
    yl = lin(xl)
    lin.packed_output = True
    assert torch.equal(lin(xl).bits, pack_signs(yl).bits)
    lin.packed_output = False
    assert torch.equal(lin(pack_signs(xl)), yl)
    with pytest.raises(ValueError, match="mode='both'"):
        pack_model(BinaryConv2d(3, 4, 3))(pack_channels(torch.randn(1, 3, 5, 5)))
