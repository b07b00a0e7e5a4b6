"""Binary max-pool on packed channel words against float64 ``F.max_pool2d`` of the unpacked values.

Every backend, channels 1, 31, 33, 65 (word boundaries), prime H/W, kernel / stride / padding /
dilation, signs (AND) and spikes (OR); the nn layer against ``nn.MaxPool2d``; input checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdengine.nn import BinaryMaxPool2d
from kdengine.ops.binary import PackedSigns, binary_max_pool2d, pack_channels, pack_spikes, unpack_channels
from tests.backend_params import backend_params

CASES = [  # C, H, W, kernel, stride, padding, dilation
    (1, 5, 7, 2, None, 0, 1),
    (31, 7, 5, 3, 2, 1, 1),
    (33, 11, 13, (3, 2), (1, 2), (1, 0), (2, 1)),
    (65, 3, 3, 3, 1, 1, 1),
    (64, 13, 2, (2, 1), 1, 0, 1),
]


def _oracle(v: torch.Tensor, case) -> torch.Tensor:
    """``v``: (B, C, H, W) float64 +-1 (or 0/1) -> pooled (B, C, OH, OW)."""
    _, _, _, k, s, p, d = case
    return F.max_pool2d(v, k, s, p, d)


@pytest.mark.parametrize("backend", backend_params("binary_max_pool2d"))
@pytest.mark.parametrize("case", CASES)
def test_maxpool_signs_backends(seed, backend, case):
    c, h, w, k, s, p, d = case
    x = torch.randn(3, c, h, w)
    xp = pack_channels(x)
    got = binary_max_pool2d(xp, k, s, p, d, backend=backend)
    want = _oracle(torch.where(x < 0, -1.0, 1.0).double(), case)
    assert isinstance(got, PackedSigns) and not got.spikes
    assert got.shape == (3, want.shape[2], want.shape[3], c)
    assert torch.equal(unpack_channels(got, torch.float64), want)
    assert torch.equal(got.bits, pack_channels(want).bits)  # channel padding bits are 0


@pytest.mark.parametrize("backend", backend_params("binary_max_pool2d"))
@pytest.mark.parametrize("case", CASES[1:3])
def test_maxpool_spikes_is_or(seed, backend, case):
    c, h, w, k, s, p, d = case
    sp = (torch.rand(2, c, h, w) < 0.2).double()
    got = binary_max_pool2d(pack_spikes(sp.permute(0, 2, 3, 1)), k, s, p, d, backend=backend)
    assert got.spikes
    assert torch.equal(unpack_channels(got, torch.float64), _oracle(sp, case))


def test_maxpool_layer_floats_and_words(seed):
    x = torch.randn(2, 33, 9, 7)
    layer = BinaryMaxPool2d(3, 2, 1)
    assert torch.equal(layer(x), nn.MaxPool2d(3, 2, 1)(x))
    words = layer(pack_channels(x))
    assert torch.equal(words.bits, pack_channels(nn.MaxPool2d(3, 2, 1)(x)).bits)  # sign(max) = max(sign)
    plan = layer.inference_plan(pack_channels(x))
    assert plan.out_shape == (2, 5, 4, 33) and "AND" in plan.kind


def test_maxpool_validation():
    xp = pack_channels(torch.randn(1, 3, 5, 5))
    with pytest.raises(TypeError, match="PackedSigns"):
        binary_max_pool2d(torch.randn(1, 3, 5, 5), 2)
    with pytest.raises(ValueError, match="padding must be at most half"):
        binary_max_pool2d(xp, 2, padding=2)
    with pytest.raises(ValueError, match=r"logical shape \(B, H, W, C\)"):
        binary_max_pool2d(PackedSigns(torch.zeros(5, 1, dtype=torch.int32), 3), 2)
    with pytest.raises(ValueError, match="does not fit"):
        binary_max_pool2d(xp, 3, dilation=3)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        binary_max_pool2d(xp, 0)
    empty = binary_max_pool2d(PackedSigns(torch.zeros(0, 4, 4, 1, dtype=torch.int32), 3), 2)
    assert empty.shape == (0, 2, 2, 3)
