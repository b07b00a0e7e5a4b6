"""Multi-step spiking layers (kdengine.snn.layers) and the spike x binary-weight layers (snn.binary)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdengine.ops.if_multistep import if_multistep
from kdengine.snn import (
    CumulativeMaxPool2d,
    IFNeuron,
    IntegrateOutput,
    MultiStep,
    SpikingBinaryConv2d,
    SpikingBinaryLinear,
)


# --------------------------------------------------------------------------- IFNeuron


@pytest.mark.parametrize("v_reset", [None, -0.25])
@pytest.mark.parametrize("init_potential", [0.0, 0.5])
def test_if_neuron_equals_op_in_chunks(seed, v_reset, init_potential):
    T, B, N = 13, 3, 37
    thr = 0.8
    x = torch.randn(T, B, N) * 0.7 + 0.3
    v0 = None
    if init_potential:
        v0 = torch.full((B, N), init_potential * thr)
    s_ref, v_ref = if_multistep(x, thr, v_reset, v_init=v0, return_v=True)
    m = IFNeuron(thr, v_reset, init_potential=init_potential)
    s = torch.cat([m(x[:5]), m(x[5:6]), m(x[6:])])  # state carried across chunks
    assert torch.equal(s, s_ref)
    assert torch.equal(m.v, v_ref)
    m.reset()
    assert torch.equal(m(x), s_ref)  # reset -> same as a fresh start


def test_if_neuron_channels_last_input_same_spikes(seed):
    T, B, C, H, W = 6, 2, 5, 4, 3
    x = torch.randn(T, B, C, H, W)
    x_cl = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # same values, CL memory
    assert not x_cl.is_contiguous()
    a, b = IFNeuron(0.6, init_potential=0.5), IFNeuron(0.6, init_potential=0.5)
    s1 = torch.cat([a(x[:2]), a(x[2:])])
    s2 = torch.cat([b(x_cl[:2]), b(x_cl[2:])])
    assert torch.equal(s1, s2)
    assert torch.equal(a.v, b.v.contiguous())


def test_if_neuron_keep_selects_rows(seed):
    x = torch.randn(8, 5, 7)
    full = IFNeuron(0.5)
    s_full = torch.cat([full(x[:3]), full(x[3:])])
    part = IFNeuron(0.5)
    part(x[:3])
    idx = torch.tensor([0, 3, 4])
    part.keep(idx)
    assert torch.equal(part(x[3:, idx]), s_full[3:, idx])


def test_if_neuron_counts_spikes(seed):
    x = torch.rand(10, 4, 6)
    m = IFNeuron(0.5, count_spikes=True)
    s = m(x)
    assert m.spike_count == float(s.sum()) and m.neuron_steps == s.numel()


def test_if_neuron_bad_inputs():
    with pytest.raises(ValueError, match="v_threshold"):
        IFNeuron(0.0)
    with pytest.raises(ValueError, match="v_threshold"):
        IFNeuron(-1.0)
    with pytest.raises(ValueError, match="v_reset"):
        IFNeuron(1.0, v_reset=1.0)
    m = IFNeuron()
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="T, B"):
        m(torch.ones(3))
    m(torch.rand(3, 2, 4))
    with pytest.raises(ValueError, match="reset"):
        m(torch.rand(3, 5, 4))  # a new batch without reset()


# --------------------------------------------------------------------------- MultiStep


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(3, 4, 3, padding=1, stride=2),
    lambda: nn.AvgPool2d(2),
    lambda: nn.Flatten(),
    lambda: nn.Linear(3 * 6 * 6, 5),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_multistep_equals_loop(seed, make, channels_last):
    mod = make().eval()
    x = torch.rand(4, 2, 3, 6, 6)
    if isinstance(mod, nn.Linear):
        x = x.flatten(2)
    ms = MultiStep(mod, channels_last=channels_last)
    with torch.no_grad():
        y = ms(x)
        loop = torch.stack([mod(x[t]) for t in range(x.shape[0])])
    assert y.shape == loop.shape
    torch.testing.assert_close(y, loop, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- pooling, output


def test_cumulative_maxpool_is_rate_exact_and_keeps_spikes(seed):
    T = 20
    s = (torch.rand(T, 2, 3, 6, 6) < 0.3).float()
    pool = CumulativeMaxPool2d(2)
    y = torch.cat([pool(s[:7]), pool(s[7:])])
    # spikes in -> spikes out, and the accumulated output is the max of the accumulated inputs
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    for t in (1, 7, T):
        acc_in = s[:t].sum(0)
        assert torch.equal(y[:t].sum(0), F.max_pool2d(acc_in, 2))
    # currents: the output mean tends to maxpool of the input mean
    c = torch.randn(T, 2, 3, 6, 6)
    pool.reset()
    yc = pool(c)
    torch.testing.assert_close(yc.sum(0), F.max_pool2d(c.sum(0), 2), rtol=1e-5, atol=1e-5)


def test_integrate_output_accumulates_across_chunks(seed):
    x = torch.randn(9, 3, 4)
    m = IntegrateOutput()
    out = torch.cat([m(x[:4]), m(x[4:])])
    torch.testing.assert_close(out, torch.cumsum(x.double(), 0))
    assert torch.equal(m.prediction(), out[-1].argmax(-1))
    m.reset()
    with pytest.raises(RuntimeError):
        m.prediction()


# --------------------------------------------------------------------------- binary spiking layers


def _pm1(*shape):
    return torch.randint(0, 2, shape).float() * 2 - 1


@pytest.mark.parametrize("c,o,k,stride,pad,dil,h,w", [
    (3, 5, 3, 1, 1, 1, 7, 6),
    (16, 8, 3, 1, 1, 1, 9, 9),
    (40, 7, 3, 2, 2, 2, 11, 9),   # C > 32: two words per pixel
    (33, 4, (2, 3), (1, 2), (0, 1), 1, 6, 7),
    (1, 3, 5, 1, 2, 1, 5, 5),     # padding as large as half the kernel: border taps all padding
])
def test_spiking_binary_conv_equals_float_conv_exactly(seed, c, o, k, stride, pad, dil, h, w):
    kk = k if isinstance(k, tuple) else (k, k)
    wt = _pm1(o, c, *kk)
    scale = torch.rand(o) + 0.1
    bias = torch.randn(o)
    layer = SpikingBinaryConv2d.from_signs(wt, scale, bias, stride, pad, dil)
    assert torch.equal(layer.sign_weight(), wt)
    x = (torch.rand(3, 2, c, h, w) < 0.35).float()
    y = layer(x)
    # the integer dot product in float64 (exact), then the same float32 epilogue
    dot = F.conv2d(x.flatten(0, 1).double(), wt.double(), None, stride, pad, dil).float()
    ref = (dot * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)).unflatten(0, (3, 2))
    assert torch.equal(y, ref)


@pytest.mark.parametrize("k", [1, 31, 32, 70])
def test_spiking_binary_linear_equals_float_exactly(seed, k):
    wt = _pm1(6, k)
    scale = torch.rand(6)
    layer = SpikingBinaryLinear.from_signs(wt, scale, None)
    x = (torch.rand(4, 3, k) < 0.4).float()
    ref = (x.double() @ wt.double().T).float() * scale
    assert torch.equal(layer(x), ref)
    assert torch.equal(layer(x.bool()), ref)


def test_spiking_binary_conv_input_layouts_and_dtypes(seed):
    """Bool, integer, float16 and channels-last spikes (what IFNeuron hands on after a
    channels-last conv) give the same output as contiguous float32 spikes; the forward is the
    layer's plan."""
    wt = _pm1(6, 35, 3, 3)
    layer = SpikingBinaryConv2d.from_signs(wt, torch.rand(6) + 0.1, torch.randn(6), 1, 1, 1)
    x = (torch.rand(2, 3, 35, 8, 7) < 0.3).float()
    ref = layer(x)
    dot = F.conv2d(x.flatten(0, 1).double(), wt.double(), None, 1, 1).float()
    assert torch.equal(ref, (dot * layer.scale.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)).unflatten(0, (2, 3)))
    cl = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert not cl.is_contiguous()
    for xi in (x.bool(), x.to(torch.int64), x.half(), cl):
        assert torch.equal(layer(xi), ref)
    assert torch.equal(layer.inference_plan(x).run(x), ref)
    assert layer.inference_plan(x).out_shape == tuple(ref.shape)


def test_spiking_binary_layers_constructed_like_torch_layers(seed):
    """The torch-style constructor makes the buffers; loading a from_signs layer's state gives
    its outputs (the forward plans follow the loaded weights)."""
    wt = _pm1(4, 5, 2, 3)
    src = SpikingBinaryConv2d.from_signs(wt, torch.rand(4), torch.randn(4), 2, (1, 0), 1)
    dst = SpikingBinaryConv2d(5, 4, (2, 3), 2, (1, 0), 1, True)
    x = (torch.rand(2, 1, 5, 7, 6) < 0.5).float()
    assert not torch.equal(dst(x), src(x))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(x), src(x))
    assert torch.equal(dst.sign_weight(), wt)
    lin = SpikingBinaryLinear(9, 3)
    assert lin.bias is None and torch.equal(lin.sign_weight(), torch.ones(3, 9))
    assert torch.equal(lin(torch.ones(1, 2, 9)), torch.full((1, 2, 3), 9.0))


def test_spiking_binary_layers_reject_bad_inputs():
    layer = SpikingBinaryLinear.from_signs(_pm1(3, 8), torch.ones(3))
    with pytest.raises(ValueError, match="spikes"):
        layer(torch.full((2, 1, 8), 0.5))
    layer.check_spikes = False  # the forward plan follows the option
    assert layer(torch.full((2, 1, 8), 0.5)).shape == (2, 1, 3)
    layer.check_spikes = True
    with pytest.raises(ValueError, match="spikes"):
        layer(torch.full((2, 1, 8), 0.5))
    with pytest.raises(ValueError, match="features"):
        layer(torch.zeros(2, 1, 9))
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        SpikingBinaryLinear.from_signs(torch.rand(3, 8), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        SpikingBinaryLinear.from_signs(_pm1(3, 8), torch.ones(4))
    conv = SpikingBinaryConv2d.from_signs(_pm1(2, 3, 3, 3), torch.ones(2))
    with pytest.raises(ValueError, match="channels"):
        conv(torch.zeros(1, 1, 4, 5, 5))


def test_spiking_modules_are_kdengine_nn_layers(seed):
    """kdengine.nn names them too (IFNeuron / MultiStep / IntegrateOutput): a model built from
    kdengine.nn alone runs T steps and predicts from the integrated potential."""
    import kdengine.nn as knn

    net = nn.Sequential(
        knn.MultiStep(nn.Linear(11, 7)), knn.IFNeuron(0.5), knn.MultiStep(nn.Linear(7, 3)),
        knn.IntegrateOutput(),
    )
    x = torch.rand(6, 4, 11)
    with torch.no_grad():
        v = net(x)
        lin1, lin2 = net[0].module, net[2].module
        spikes = if_multistep(torch.stack([lin1(x[t]) for t in range(6)]), 0.5)
        expected = torch.stack([lin2(spikes[t]) for t in range(6)]).double().cumsum(0)
    assert v.shape == (6, 4, 3)
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(net[3].prediction(), expected[-1].argmax(-1))
