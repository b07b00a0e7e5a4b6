"""Binary layers (training), binarize_model, latent clipping, packed inference layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.backend_params import backend_params
from kdengine.nn import (
    BinaryConv2d,
    BinaryLinear,
    PackedBinaryConv2d,
    PackedBinaryLinear,
    binarize_model,
    channel_scale,
    clip_latent_weights_,
    pack_model,
    sign_ste,
    state_nbytes,
)
from kdengine.ops.binary import binary_conv2d, pack_signs


def _sign(x: torch.Tensor) -> torch.Tensor:
    """The sign convention of pack_signs: x >= 0 is +1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


# --------------------------------------------------------------------------- sign + STE


def test_sign_ste_forward_values(seed):
    x = torch.randn(257, dtype=torch.float64) * 3
    x[:4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30], dtype=torch.float64)
    y = sign_ste(x)
    assert y.dtype == x.dtype
    assert torch.equal(y, _sign(x))
    assert y[0] == 1 and y[1] == 1 and y[2] == 1 and y[3] == -1  # -0.0 >= 0 is True


def test_sign_ste_nan_in_nan_out():
    y = sign_ste(torch.tensor([float("nan"), -2.0, 2.0]))
    assert torch.isnan(y[0]) and y[1] == -1 and y[2] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sign_ste_gradient_is_clipped_straight_through(seed, dtype):
    """BinaryNet's definition: d sign(x)/dx := 1 where |x| <= 1 (boundaries included), else 0."""
    x = (torch.rand(1000, dtype=torch.float64) * 6 - 3).to(dtype)
    x[:6] = torch.tensor([-1.0, 1.0, 0.0, 1.0000001, -1.0000001, 3.0], dtype=dtype)
    x.requires_grad_(True)
    g = torch.randn(1000, dtype=dtype)
    (gx,) = torch.autograd.grad(sign_ste(x), x, g)
    expected = torch.where(x.detach().abs() <= 1, g, torch.zeros_like(g))
    assert torch.equal(gx, expected)
    assert gx[0] == g[0] and gx[1] == g[1] and gx[2] == g[2]
    assert gx[3] == 0 and gx[4] == 0 and gx[5] == 0


def test_sign_ste_rejects_bad_input():
    with pytest.raises(TypeError, match="floating"):
        sign_ste(torch.tensor([1, -1]))
    with pytest.raises(TypeError, match="Tensor"):
        sign_ste([1.0])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("mode", ["weights", "both"])
@pytest.mark.parametrize("bias", [False, True])
def test_binary_linear_forward_matches_formula(seed, mode, bias):
    layer = BinaryLinear(37, 5, bias=bias, mode=mode, dtype=torch.float64)
    x = torch.randn(3, 4, 37, dtype=torch.float64)
    w = layer.weight.detach()
    a = _sign(x) if mode == "both" else x
    ref = (a @ _sign(w).T) * w.abs().mean(1)
    if bias:
        ref = ref + layer.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["weights", "both"])
def test_binary_linear_gradient_matches_xnor_definition(seed, mode):
    """dL/dW = STE(W) * dL/dsign(W) + sign(W)/K * dL/dalpha (XNOR-Net), dL/dx through the STE."""
    K, O = 19, 6
    layer = BinaryLinear(K, O, mode=mode, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.mul_(20).clamp_(-1.5, 1.5)  # some latent weights outside [-1, 1]
    x = (torch.randn(8, K, dtype=torch.float64) * 1.5).requires_grad_(True)
    g = torch.randn(8, O, dtype=torch.float64)
    gx, gw = torch.autograd.grad(layer(x), (x, layer.weight), g)

    w = layer.weight.detach()
    xd = x.detach()
    a = _sign(xd) if mode == "both" else xd
    s, alpha = _sign(w), w.abs().mean(1)
    d_s = (g * alpha).T @ a                       # dL/dsign(W), (O, K)
    d_alpha = (g * (a @ s.T)).sum(0)              # dL/dalpha, (O,)
    gw_ref = d_s * (w.abs() <= 1) + d_alpha[:, None] * torch.sign(w) / K
    d_a = (g * alpha) @ s
    gx_ref = d_a * (xd.abs() <= 1) if mode == "both" else d_a
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["weights", "both"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((1, 2), (0, 1), 1)])
def test_binary_conv2d_forward_matches_formula(seed, mode, stride, padding, dilation):
    layer = BinaryConv2d(3, 4, (3, 2), stride=stride, padding=padding, dilation=dilation,
                         bias=True, mode=mode, dtype=torch.float64)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    w = layer.weight.detach()
    a = _sign(x) if mode == "both" else x
    p = layer.padding
    a = F.pad(a, (p[1], p[1], p[0], p[0]))  # explicit zeros *after* the sign: they contribute 0
    ref = F.conv2d(a, _sign(w), None, layer.stride, 0, layer.dilation)
    ref = ref * w.abs().mean((1, 2, 3)).view(1, -1, 1, 1) + layer.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


def test_binary_conv2d_backward_runs_and_is_finite(seed):
    layer = BinaryConv2d(2, 3, 3, padding=1, mode="both")
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    layer(x).square().sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(x.grad).all()
    assert layer.weight.grad.abs().sum() > 0


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        BinaryLinear(4, 4, mode="activations")
    with pytest.raises(ValueError, match="in_features"):
        BinaryLinear(0, 4)
    with pytest.raises(ValueError, match="padding"):
        BinaryConv2d(2, 2, 3, padding="same")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stride"):
        BinaryConv2d(2, 2, 3, stride=0)


# --------------------------------------------------------------------------- binarize_model


def _mlp_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10),
    )


def test_binarize_model_keeps_first_and_last(seed):
    model = _mlp_cnn()
    out = binarize_model(model, mode="both")
    assert type(out[0]) is nn.Conv2d and type(out[8]) is nn.Linear
    assert isinstance(out[2], BinaryConv2d) and out[2].mode == "both" and out[2].bias is None
    assert isinstance(out[6], BinaryLinear) and out[6].bias is not None
    # latent weights are copies of the float ones; the original model is untouched
    assert torch.equal(out[2].weight, model[2].weight) and torch.equal(out[6].bias, model[6].bias)
    assert type(model[2]) is nn.Conv2d
    # keep_first_last=False binarizes everything; exclude keeps a named layer
    allb = binarize_model(model, keep_first_last=False, exclude=["6"])
    assert isinstance(allb[0], BinaryConv2d) and isinstance(allb[8], BinaryLinear)
    assert type(allb[6]) is nn.Linear


def test_binarize_model_nested_and_inplace():
    inner = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 7))
    model = nn.Sequential(nn.Linear(4, 5), inner, nn.Linear(7, 3))
    same = binarize_model(model, inplace=True)
    assert same is model
    assert all(isinstance(m, BinaryLinear) for m in inner)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_binarize_model_clips_latent_weights():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    out = binarize_model(model)
    assert out[1].weight.max() == 1.0


def test_binarize_model_errors():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                          nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="'1'.*padding_mode"):
        binarize_model(model)
    assert isinstance(binarize_model(model, keep_first_last=False, exclude=["1"])[0], BinaryConv2d)
    with pytest.raises(ValueError, match="mode"):
        binarize_model(model, mode="all")
    with pytest.raises(ValueError, match="exclude"):
        binarize_model(model, exclude=["nope"])
    with pytest.raises(TypeError, match="nn.Module"):
        binarize_model("model")  # type: ignore[arg-type]


def test_clip_latent_weights_only_touches_binary_layers():
    model = binarize_model(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)))
    with torch.no_grad():
        for m in model:
            m.weight.fill_(2.5)
    clip_latent_weights_(model)
    assert model[1].weight.max() == 1.0
    assert model[0].weight.max() == 2.5 and model[2].weight.max() == 2.5
    with pytest.raises(ValueError, match="bound"):
        clip_latent_weights_(model, bound=0)


def test_training_step_changes_latent_weights(seed):
    model = binarize_model(_mlp_cnn(), mode="weights")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model[2].weight.detach().clone()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    clip_latent_weights_(model)
    assert not torch.equal(before, model[2].weight)
    assert model[2].weight.abs().max() <= 1.0


# --------------------------------------------------------------------------- packing


def _odd_model(mode: str) -> nn.Sequential:
    """Odd K everywhere: conv K = 3*3*3 = 27, 5*2*3 = 30; linear K = 5*3*2 = 30, 33."""
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3),
        nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, bias=True), nn.BatchNorm2d(5),
        nn.Conv2d(5, 5, (2, 3), padding=(1, 2), dilation=(1, 2)), nn.MaxPool2d(2), nn.BatchNorm2d(5),
        nn.Flatten(), nn.Linear(30, 33), nn.BatchNorm1d(33), nn.Linear(33, 7, bias=False),
        nn.BatchNorm1d(7), nn.Linear(7, 4),
    )
    b = binarize_model(m, mode=mode)
    # make batch-norm statistics non-trivial, then evaluate
    b.train()
    with torch.no_grad():
        b(torch.randn(16, 2, 11, 10))
    return b.eval()


@pytest.mark.parametrize("mode", ["weights", "both"])
def test_packed_model_matches_training_model(seed, mode):
    model = _odd_model(mode)
    packed = pack_model(model)
    assert not packed.training
    kinds = [type(m).__name__ for m in packed]
    assert kinds.count("PackedBinaryConv2d") == 2 and kinds.count("PackedBinaryLinear") == 2
    assert kinds[0] == "Conv2d" and kinds[-1] == "Linear"
    assert isinstance(model[2], BinaryConv2d)  # the training model is not modified
    x = torch.randn(6, 2, 11, 10)
    with torch.no_grad():
        ref, out = model(x), packed(x)
    if mode == "weights":
        # same float operations on the same +-1 values: bit-identical
        assert torch.equal(out, ref)
    else:
        # integer popcounts times the scale vs float sums of +-1 times the scale: equal up to
        # float rounding of the full-precision layers around them
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("backend", backend_params("binary_conv2d"))
def test_packed_both_mode_every_backend(seed, backend):
    """The packed XNOR path on each backend reproduces the training model (tiny: the triton
    interpreter is slow)."""
    model = _odd_model("both")
    packed = pack_model(model, backend=backend)
    assert all(m.backend == backend for m in packed.modules() if hasattr(m, "backend"))
    x = torch.randn(2, 2, 11, 10)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["weights", "both"])
def test_packed_layers_hold_signs_scales_and_32x_fewer_bytes(seed, mode):
    lin = BinaryLinear(96, 10, bias=True, mode=mode)
    conv = BinaryConv2d(3, 4, 3, mode=mode)  # K = 27: one padded word
    plin, pconv = pack_model(lin), pack_model(conv)
    assert isinstance(plin, PackedBinaryLinear) and isinstance(pconv, PackedBinaryConv2d)
    assert plin.weight_bits.dtype == torch.int32 and plin.weight_bits.shape == (10, 3)
    assert pconv.weight_bits.shape == (4, 1) and pconv.k == 27
    assert torch.equal(plin.packed_weight.unpack(torch.float32), _sign(lin.weight.detach()))
    assert torch.equal(pconv.packed_weight.unpack(torch.float32), _sign(conv.weight.detach().flatten(1)))
    assert torch.equal(plin.scale, channel_scale(lin.weight.detach()))
    assert torch.equal(plin.bias, lin.bias.detach())
    assert plin.weight_bits.nbytes * 32 == lin.weight.nbytes
    # whole-layer state: bits + scale + bias vs fp32 weight + bias
    assert state_nbytes(plin) == 10 * 3 * 4 + 10 * 4 + 10 * 4
    assert not any(p.requires_grad for p in plin.parameters())


def test_packed_weights_mode_cache_follows_the_bits(seed):
    lin = BinaryLinear(40, 3, mode="weights")
    packed = pack_model(lin)
    x = torch.randn(2, 40)
    y0 = packed(x)
    with torch.no_grad():
        packed.weight_bits.bitwise_not_()  # every sign flips (padding bits too; irrelevant here)
        packed.weight_bits[:, -1] &= (1 << 8) - 1  # keep padding bits 0: K = 40 = 32 + 8
    torch.testing.assert_close(packed(x), -y0)


def test_packed_layer_input_errors():
    plin = pack_model(BinaryLinear(8, 3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        plin(torch.randn(2, 9))
    pconv = pack_model(BinaryConv2d(2, 3, 3))
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        pconv(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError, match="BinaryLinear"):
        PackedBinaryLinear.from_binary(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="nn.Module"):
        pack_model(3)  # type: ignore[arg-type]


def _random_packed_conv(c, o, k, stride, padding, dilation, mode="both"):
    layer = PackedBinaryConv2d(c, o, k, stride, padding, dilation, True, mode)
    kk = layer.kernel_size
    with torch.no_grad():
        layer.weight_bits.copy_(pack_signs(torch.randn(o, c * kk[0] * kk[1])).bits)
        layer.scale.copy_(torch.rand(o) + 0.1)
        layer.bias.copy_(torch.randn(o))
    return layer


@pytest.mark.parametrize("c,o,k,stride,padding,dilation,h,w", [
    (3, 5, 3, 1, 1, 1, 7, 6),
    (40, 7, 3, 2, 2, 2, 11, 9),          # C > 32: two words per pixel; padding on every border
    (33, 4, (2, 3), (1, 2), (0, 1), 1, 6, 7),
    (1, 3, 5, 1, 2, 1, 5, 5),            # every border tap of the corner outputs is padding
    (8, 6, 3, 1, 0, 1, 5, 5),            # no padding: only the channel-padding shift
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_conv_forward_equals_binary_conv2d_op(seed, c, o, k, stride, padding, dilation, h, w, dtype):
    """The layer's channel-word plan (weights repacked and border correction computed by the
    layer) gives exactly what the public op gives, on the auto backend and on the reference."""
    layer = _random_packed_conv(c, o, k, stride, padding, dilation)
    x = torch.randn(2, c, h, w, dtype=dtype)
    args = (layer.packed_weight, k, layer.scale, layer.bias, stride, padding, dilation)
    y = layer(x)
    assert y.dtype == dtype and y.shape == binary_conv2d(x, *args).shape
    assert torch.equal(y, binary_conv2d(x, *args))
    assert torch.equal(y, binary_conv2d(x, *args, backend="reference"))
    # the forward is the layer's plan: the same numbers from inference_plan(x).run
    plan = layer.inference_plan(x)
    assert plan.out_shape == tuple(y.shape)
    assert torch.equal(plan.run(x), y)


def test_packed_forward_plans_follow_the_weights(seed):
    layer = _random_packed_conv(4, 3, 3, 1, 1, 1)
    x = torch.randn(1, 4, 6, 6)
    y0 = layer(x)
    with torch.no_grad():
        layer.scale.mul_(2.0)
    y1 = layer(x)
    assert not torch.equal(y1, y0)
    assert torch.equal(y1, binary_conv2d(x, layer.packed_weight, 3, layer.scale, layer.bias, 1, 1, 1))
    other = _random_packed_conv(4, 3, 3, 1, 1, 1)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))


def test_copied_layer_builds_its_own_plans(seed, tmp_path):
    """Plans hold the layer's tensors: a deep copy (what pack_model makes) or a reload must not run
    the original's plans."""
    import copy

    layer = _random_packed_conv(3, 4, 3, 1, 1, 1)
    x = torch.randn(2, 3, 5, 5)
    y = layer(x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.bias.add_(1.0)
    assert torch.equal(layer(x), y)
    assert torch.equal(twin(x), binary_conv2d(x, twin.packed_weight, 3, twin.scale, twin.bias, 1, 1, 1))
    assert not torch.equal(twin(x), y)
    torch.save(layer, tmp_path / "l.pt")
    assert torch.equal(torch.load(tmp_path / "l.pt", weights_only=False)(x), y)


def test_packed_forward_gradients(seed):
    """mode "both" runs the inference-only popcount kernels: no graph, and torch.func gradient
    transforms refuse (they would silently give zeros); mode "weights" is a float matmul with the
    input's gradient."""
    from kdengine.snn import SpikingBinaryLinear

    for layer, x in ((pack_model(BinaryLinear(40, 5, mode="both")), torch.randn(3, 40)),
                     (_random_packed_conv(3, 4, 3, 1, 1, 1), torch.randn(2, 3, 6, 6)),
                     (SpikingBinaryLinear(8, 3), torch.ones(2, 1, 8))):
        assert not layer(x.clone().requires_grad_()).requires_grad
        with pytest.raises(RuntimeError, match="torch.func"):
            torch.func.grad(lambda t, layer=layer: layer(t).sum())(x)
    lin = BinaryLinear(40, 5, mode="weights")
    packed = pack_model(lin)
    x = torch.randn(3, 40, requires_grad=True)
    (g,) = torch.autograd.grad(packed(x).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(lin(x2).sum(), x2)
    assert torch.equal(g, g_ref)


def test_constructor_argument_orders_follow_torch():
    """Every linear layer takes (in_features, out_features, bias, ...) and every conv
    (in_channels, out_channels, kernel_size, stride, padding, dilation, bias, ...): torch's order
    (nn.Conv2d has groups before bias; these layers take groups as their last argument)."""
    import inspect

    from kdengine.snn import SpikingBinaryConv2d, SpikingBinaryLinear

    def lead(cls, n):
        return list(inspect.signature(cls).parameters)[:n]

    lin = ["in_features", "out_features", "bias"]
    conv = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "bias"]
    assert lead(nn.Linear, 3) == lin
    assert [p for p in lead(nn.Conv2d, 8) if p != "groups"] == conv
    for cls in (BinaryLinear, PackedBinaryLinear, SpikingBinaryLinear):
        assert lead(cls, 3) == lin, cls
    for cls in (BinaryConv2d, PackedBinaryConv2d, SpikingBinaryConv2d):
        assert lead(cls, 7) == conv, cls
    # binary and packed layers: mode right after bias, so positional calls mean the same thing
    assert lead(BinaryLinear, 4)[3] == lead(PackedBinaryLinear, 4)[3] == "mode"
    assert lead(BinaryConv2d, 8)[7] == lead(PackedBinaryConv2d, 8)[7] == "mode"
    p = PackedBinaryConv2d(2, 3, 3, 2, 1, 1, True, "both")
    assert (p.stride, p.padding, p.bias is not None, p.mode) == ((2, 2), (1, 1), True, "both")


@pytest.mark.parametrize("first", ["kdengine.nn", "kdengine.snn"])
def test_nn_and_snn_import_without_a_cycle(first):
    """kdengine.snn builds on kdengine.nn, never the other way: importing kdengine.nn alone does
    not import kdengine.snn, either package imports first in a fresh interpreter, and the spiking
    layers that kdengine.nn names resolve to kdengine.snn's."""
    import ast
    import pathlib
    import subprocess
    import sys

    import kdengine.nn as knn

    code = (
        "import importlib, sys\n"
        f"importlib.import_module({first!r})\n"
        "print('kdengine.snn' in sys.modules)\n"
        "import kdengine.nn, kdengine.snn\n"
        "assert kdengine.nn.IFNeuron is kdengine.snn.IFNeuron\n"
        "assert kdengine.nn.MultiStep is kdengine.snn.MultiStep\n"
        "assert kdengine.nn.IntegrateOutput is kdengine.snn.IntegrateOutput\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(first == "kdengine.snn")
    # no module of kdengine.nn imports kdengine.snn at module level
    for path in pathlib.Path(knn.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith("kdengine.snn") for n in names), (path.name, names)
