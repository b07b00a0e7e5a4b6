"""Grouped binary conv2d against float64 ``F.conv2d(sign(x), sign(W), groups=g)``.

Every backend; groups of 1 channel (depthwise), 31/33 channels (not whole words), 32 and 128
(whole words, the per-group GEMM path on cpu); packed input and packed output; the training
layer, its packed copy (both modes) and a save/load round trip; input checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdengine.nn import BinaryConv2d, PackedBinaryConv2d, pack_model
from kdengine.ops.binary import binary_conv2d, pack_channels, pack_signs
from tests.backend_params import backend_params

CASES = [  # C, O, groups, H, W, kernel, stride, padding, dilation
    (1, 1, 1, 5, 7, 3, 1, 1, 1),
    (33, 33, 33, 7, 5, 3, 1, 1, 1),
    (31, 62, 31, 11, 7, (3, 1), (2, 1), (1, 0), (1, 2)),
    (66, 10, 2, 5, 5, 3, 2, 2, 1),
    (64, 32, 2, 3, 5, (1, 3), 1, (0, 1), 1),
    (256, 64, 2, 3, 3, 3, 1, 1, 1),
]


def _oracle(x, w_bits, case, scale, bias):
    c, o, g, h, wd, k, s, p, d = case
    kh, kw = (k, k) if isinstance(k, int) else k
    sx = torch.where(x < 0, -1.0, 1.0).double()
    w = w_bits.unpack(torch.float64).view(o, c // g, kh, kw)
    dot = F.conv2d(sx, w, None, s, p, d, g).round().float()
    return (dot * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)).to(x.dtype)


def _params() -> list:
    """backend x case; the interpreter runs one GEMM per group, so triton with many groups is slow."""
    out = []
    for p in backend_params("binary_conv2d"):
        for i, case in enumerate(CASES):
            slow = [pytest.mark.slow] if p.values[0] == "triton" and case[2] > 4 else []
            out.append(pytest.param(p.values[0], case, marks=[*p.marks, *slow], id=f"{p.id}-case{i}"))
    return out


@pytest.mark.parametrize("backend,case", _params())
def test_grouped_conv_backends(seed, backend, case):
    c, o, g, h, wd, k, s, p, d = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, c, h, wd)
    w = pack_signs(torch.randn(o, c // g * kh * kw))
    scale, bias = torch.randn(o), torch.randn(o)
    want = _oracle(x, w, case, scale, bias)
    got = binary_conv2d(x, w, k, scale, bias, s, p, d, groups=g, backend=backend)
    assert torch.equal(got, want)
    assert torch.equal(binary_conv2d(pack_channels(x), w, k, scale, bias, s, p, d, groups=g, backend=backend),
                       want)
    bits = binary_conv2d(x, w, k, scale, bias, s, p, d, groups=g, packed_output=True, backend=backend)
    assert torch.equal(bits.bits, pack_channels(want).bits)


@pytest.mark.parametrize("mode", ["both", "weights"])
def test_grouped_layers_pack_and_serialize(seed, tmp_path, mode):
    from kdengine.serialize import load_packed, save_packed

    model = nn.Sequential(BinaryConv2d(12, 12, 3, padding=1, groups=12, mode=mode, bias=True),
                          BinaryConv2d(12, 6, 3, groups=3, mode=mode)).eval()
    assert model[0].weight.shape == (12, 1, 3, 3) and "groups=12" in repr(model[0])
    x = torch.randn(2, 12, 7, 6)
    packed = pack_model(model)
    assert isinstance(packed[0], PackedBinaryConv2d) and packed[0].groups == 12
    torch.testing.assert_close(packed(x), model(x), rtol=0, atol=0)
    save_packed(packed, tmp_path / "m.safetensors", input_shape=(12, 7, 6))
    again = load_packed(tmp_path / "m.safetensors")
    assert again[1].groups == 3 and torch.equal(again(x), packed(x))


def test_binarize_model_keeps_groups():
    from kdengine.nn import binarize_model

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 2, 1))
    out = binarize_model(model, mode="both")
    assert isinstance(out[1], BinaryConv2d) and out[1].groups == 4


def test_grouped_validation():
    x = torch.randn(1, 6, 5, 5)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        binary_conv2d(x, pack_signs(torch.randn(4, 9)), 3, groups=4)
    with pytest.raises(ValueError, match="groups must be an int >= 1"):
        binary_conv2d(x, pack_signs(torch.randn(4, 54)), 3, groups=0)
    with pytest.raises(ValueError, match=r"\(C/groups\)\*kh\*kw=27"):
        binary_conv2d(x, pack_signs(torch.randn(4, 54)), 3, groups=2)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        BinaryConv2d(6, 8, 3, groups=4)
