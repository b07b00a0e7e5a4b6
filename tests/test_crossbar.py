"""kdengine.crossbar: ideal crossbar == packed kernels bit for bit, ADC model, bit flips, counts."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from kdengine.crossbar import adc_quantize, calibrate_adc_clip, simulate
from kdengine.infer import load
from kdengine.nn import PackedBinaryConv2d, PackedBinaryLinear, binarize_model, pack_model
from kdengine.ops import pack_signs, pack_spikes
from kdengine.serialize import save_packed


def _bn_(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def packed_net(seed: int, c1: int = 5, c2: int = 9, hidden: int = 45, mode: str = "both") -> nn.Module:
    """conv (fp) | binary conv with padding | binary conv stride 2 + dilation | binary fc | fc."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1),
        nn.Conv2d(c1, c2, 3, padding=1, bias=True), nn.MaxPool2d(2), nn.BatchNorm2d(c2),
        nn.Conv2d(c2, c2, (3, 2), stride=2, padding=(2, 1), dilation=(2, 1)), nn.BatchNorm2d(c2),
        nn.Flatten(), nn.Linear(c2 * 3 * 4, hidden, bias=True), nn.BatchNorm1d(hidden),
        nn.Linear(hidden, 10),
    )
    b = binarize_model(m, mode=mode).eval()
    _bn_(b, torch.Generator().manual_seed(seed + 7))
    return pack_model(b)


def _eager(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("rows", [1, 7, 32, 45, 100, 128, 256, 4096])
def test_ideal_crossbar_equals_packed_kernels_bitwise(rows, seed):
    model = packed_net(seed % 1000)
    x = torch.randn(5, 1, 12, 12)
    y, st = simulate(model, x, rows=rows)
    assert torch.equal(y, _eager(model, x))
    assert len(st.layers) == 3 and st.digital_binary_layers == []
    assert st.layers[0].saturations == 0 and st.layers[0].adc_abs_err_sum == 0


def test_ideal_equals_packed_linear_large_k(seed):
    g = torch.Generator().manual_seed(seed)
    layer = PackedBinaryLinear(1000, 70, mode="both", bias=True)
    w = torch.randn(70, 1000, generator=g)
    layer.weight_bits.copy_(pack_signs(w).bits)
    layer.scale.copy_(w.abs().mean(1))
    layer.bias.copy_(torch.randn(70, generator=g))
    x = torch.randn(9, 1000, generator=g)
    assert layer.k % 32 != 0  # padding bits in the last word
    for rows in (128, 256, 333):
        y, _ = simulate(layer, x, rows=rows)
        assert torch.equal(y, _eager(layer, x))


def test_flip_every_bit_negates_every_dot(seed):
    """bit_error_rate=1 flips all N*K stored bits (never the padding bits): the result must be the
    packed kernels run on the complemented weights, exactly."""
    model = packed_net(seed % 1000)
    flipped = copy.deepcopy(model)
    for m in flipped.modules():
        if isinstance(m, (PackedBinaryLinear, PackedBinaryConv2d)):
            full = torch.ones(m.weight_bits.shape[0], m.k, dtype=torch.bool)
            m.weight_bits ^= pack_spikes(full).bits  # the valid bits only: padding stays 0
    x = torch.randn(4, 1, 12, 12)
    y, st = simulate(model, x, bit_error_rate=1.0)
    assert torch.equal(y, _eager(flipped, x))
    assert st.flipped_bits == sum(s.weight_bits for s in st.layers)


def test_bit_flips_seeded_rate_and_model_untouched(seed):
    model = packed_net(seed % 1000, c1=8, c2=16, hidden=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 1, 12, 12)
    q = 0.05
    y1, s1 = simulate(model, x, bit_error_rate=q, seed=3)
    y2, s2 = simulate(model, x, bit_error_rate=q, seed=3)
    y3, s3 = simulate(model, x, bit_error_rate=q, seed=4)
    assert torch.equal(y1, y2) and s1.flipped_bits == s2.flipped_bits
    assert not torch.equal(y1, y3)
    n = sum(s.weight_bits for s in s1.layers)
    for s in (s1, s3):  # binomial(n, q): within 5 standard deviations
        assert abs(s.flipped_bits - n * q) < 5 * math.sqrt(n * q * (1 - q))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    y0, s0 = simulate(model, x, bit_error_rate=0.0, seed=3)
    assert s0.flipped_bits == 0 and torch.equal(y0, _eager(model, x))


def test_adc_quantize_hand_computed():
    p = torch.arange(-4.0, 5.0)
    # n=4, 2 bits: levels -4, -4/3, 4/3, 4; code = round((p + 4) * 3 / 8), half to even
    exp = torch.tensor([-4, -4, -4 / 3, -4 / 3, 4 / 3, 4 / 3, 4 / 3, 4, 4], dtype=torch.float64)
    torch.testing.assert_close(adc_quantize(p, 4, 2), exp, rtol=0, atol=1e-12)
    # 1 bit: a comparator at 0 (ties down), outputs +-c
    torch.testing.assert_close(adc_quantize(torch.tensor([-3.0, 0.0, 1.0]), 128, 1),
                               torch.tensor([-128.0, -128.0, 128.0], dtype=torch.float64))
    # window +-8 with 2 bits: levels -8, -8/3, 8/3, 8; 100 saturates; -3 -> code round(0.9375) = 1
    torch.testing.assert_close(adc_quantize(torch.tensor([100.0, -100.0, -3.0]), 128, 2, clip=8),
                               torch.tensor([8.0, -8.0, -8 / 3], dtype=torch.float64))
    # clip larger than the tile: the tile's range wins
    torch.testing.assert_close(adc_quantize(torch.tensor([3.0]), 4, 2, clip=50),
                               adc_quantize(torch.tensor([3.0]), 4, 2))
    with pytest.raises(ValueError, match="bits"):
        adc_quantize(p, 4, 0)


def test_adc_error_bounded_and_shrinks_with_bits(seed):
    model = packed_net(seed % 1000, c1=8, c2=16, hidden=64)
    x = torch.randn(6, 1, 12, 12)
    ideal, _ = simulate(model, x, rows=64)
    errs = []
    for bits in (2, 4, 6, 8, 12):
        y, st = simulate(model, x, rows=64, adc_bits=bits)
        for s in st.layers:
            # |ADC(p) - p| <= step / 2 = n_t / (2^b - 1) <= rows / (2^b - 1) (full range)
            assert s.adc_mean_abs_error <= 64 / (2 ** bits - 1) + 1e-9
            assert s.saturations == 0
        errs.append(sum(s.adc_mean_abs_error for s in st.layers))
    assert all(a > b for a, b in zip(errs, errs[1:]))
    y16, _ = simulate(model, x, rows=64, adc_bits=16)
    assert (y16 - ideal).abs().max() < 0.05 * ideal.abs().max()


def test_clip_saturates_and_calibration(seed):
    model = packed_net(seed % 1000, c1=8, c2=16, hidden=64)
    x = torch.randn(8, 1, 12, 12)
    _, st = simulate(model, x, rows=128, adc_bits=3, adc_clip=2.0)
    assert all(0 < s.saturations <= s.adc_conversions for s in st.layers)
    clips = calibrate_adc_clip(model, x, rows=128, n_sigma=3.0)
    assert set(clips) == {s.name for s in st.layers}
    _, st2 = simulate(model, x, rows=128, adc_bits=4, adc_clip=clips)
    for s in st2.layers:  # a 3-sigma window clips only the tails
        assert s.saturations < 0.05 * s.adc_conversions
    with pytest.raises(ValueError, match="not packed binary layers"):
        simulate(model, x, adc_bits=3, adc_clip={"nope": 3.0})


def test_counts_linear():
    layer = PackedBinaryLinear(300, 50, mode="both")
    x = torch.randn(7, 300)
    _, st = simulate(layer, x, rows=128, cols=16)
    s = st.layers[0]
    assert (s.row_tiles, s.col_tiles, s.arrays) == (3, 4, 12)
    assert s.vectors == 7
    assert s.tile_activations == 7 * 3 * 4
    assert s.adc_conversions == 7 * 3 * 50
    assert s.digital_adds == 7 * 2 * 50
    assert s.weight_bits == 300 * 50
    assert st.to_dict()["totals"]["adc_conversions"] == 7 * 3 * 50


def test_counts_conv_and_chunking():
    conv = PackedBinaryConv2d(6, 4, 3, stride=2, padding=1, mode="both")
    x = torch.randn(5, 6, 9, 9)  # K = 54 -> 1 tile at 128 rows; output 5x5
    y_full, st = simulate(conv, x, rows=128)
    assert st.layers[0].vectors == 5 * 5 * 5
    assert st.layers[0].adc_conversions == 5 * 25 * 4
    y_chunked, st2 = simulate(conv, x, rows=16, batch_size=2)  # 4 tiles, 3 batch chunks
    assert torch.equal(y_full, y_chunked)
    assert st2.layers[0].row_tiles == 4 and st2.layers[0].tile_activations == 125 * 4


def test_weights_mode_layers_run_digitally():
    model = packed_net(1, mode="weights")
    x = torch.randn(3, 1, 12, 12)
    y, st = simulate(model, x, adc_bits=2, bit_error_rate=0.5)
    assert st.layers == [] and len(st.digital_binary_layers) == 3
    assert torch.equal(y, _eager(model, x))


def test_accepts_path_and_inference_model(tmp_path):
    model = packed_net(2)
    path = tmp_path / "m.safetensors"
    save_packed(model, path)
    x = torch.randn(2, 1, 12, 12)
    ref = _eager(model, x)
    assert torch.equal(simulate(str(path), x)[0], ref)
    assert torch.equal(simulate(load(path), x)[0], ref)


def test_argument_errors():
    layer = PackedBinaryLinear(40, 8, mode="both")
    x = torch.randn(2, 40)
    with pytest.raises(ValueError, match="rows"):
        simulate(layer, x, rows=0)
    with pytest.raises(ValueError, match="adc_bits"):
        simulate(layer, x, adc_bits=0)
    with pytest.raises(TypeError, match="adc_bits"):
        simulate(layer, x, adc_bits=2.5)
    with pytest.raises(ValueError, match="bit_error_rate"):
        simulate(layer, x, bit_error_rate=1.5)
    with pytest.raises(ValueError, match="adc_clip needs adc_bits"):
        simulate(layer, x, adc_clip=3.0)
    with pytest.raises(ValueError, match="adc_clip"):
        simulate(layer, x, adc_bits=3, adc_clip=-1.0)
    with pytest.raises(TypeError, match="floating"):
        simulate(layer, torch.ones(2, 40, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        simulate(layer, torch.full((2, 40), float("nan")))
    with pytest.raises(TypeError, match="model"):
        simulate(3, x)
