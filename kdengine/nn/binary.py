"""Training-time binary layers: latent real weights, sign with a clipped straight-through estimator.

The recipe (BinaryNet, Courbariaux et al. 2016; XNOR-Net, Rastegari et al. 2016; the VGG recipe of
Lu & Sengupta 2020, docs/papers.md section 3):

* Each binary layer keeps a real-valued *latent* weight ``W``. The forward pass uses
  ``sign(W)`` (``w >= 0`` is +1, the same convention as :func:`kdengine.ops.pack_signs`) times a
  per-output-channel scale ``alpha_o = mean_k |W[o, k]|`` (XNOR-Net).
* ``sign`` has zero derivative almost everywhere, so its backward is the clipped straight-through
  estimator: ``d sign(x) / dx := 1 if |x| <= 1 else 0`` (BinaryNet). Gradients flow into ``W``
  both through the sign (STE) and through ``alpha`` (exact), as in XNOR-Net.
* After each optimizer step the latent weights are clipped to ``[-1, 1]``
  (:func:`clip_latent_weights_`), so they cannot drift away where the STE would stop them.
* ``mode="weights"``: binary weights, real activations (the recipe of docs/papers.md section 3: the
  ReLU stays). ``mode="both"``: the layer's input is binarized too, with the same clipped STE, so
  the layer computes exactly what the packed XNOR-popcount kernels compute:
  ``(sign(x) @ sign(W)^T) * alpha + bias``.

Why the scale is applied after the product: ``(sign(x) @ sign(W)^T)`` is a sum of +-1 terms, which
float32 holds exactly (while |sum| < 2^24), so multiplying by ``alpha`` afterwards gives the same
float32 number as the packed kernel's ``int32 * scale``; and in ``mode="weights"`` the packed
inference layer runs the very same float operations on the unpacked +-1 weights. That is what lets
the packed model reproduce the training model's predictions (see :mod:`kdengine.nn.packed`).

Zero padding in :class:`BinaryConv2d` (``mode="both"``): the input is binarized first and then
zero-padded, so padded positions contribute 0 to the sum, exactly like
:func:`kdengine.ops.binary_conv2d`.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Iterable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

MODES = ("weights", "both")

__all__ = [
    "MODES",
    "SignSTE",
    "sign_ste",
    "channel_scale",
    "BinaryLinear",
    "BinaryConv2d",
    "binarize_model",
    "clip_latent_weights_",
    "binary_layers",
]


# --------------------------------------------------------------------------- sign + STE


class SignSTE(torch.autograd.Function):
    """``sign(x)`` (``x >= 0`` is +1, ``x < 0`` is -1, NaN stays NaN) with the clipped
    straight-through gradient ``grad_in = grad_out * 1[|x| <= 1]`` (BinaryNet).

    Higher orders: the backward is made of differentiable torch ops, so double backward
    (``create_graph=True``) is that of the STE formula -- linear in ``grad_out``, and zero in
    ``x`` (the clip mask is piecewise constant). ``setup_context`` style with a generated vmap
    rule, so ``torch.func.grad`` / ``vmap`` work too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        one = torch.ones((), dtype=x.dtype, device=x.device)
        out = torch.where(x >= 0, one, -one)
        # NaN in -> NaN out: ``x >= 0`` is False for NaN, which would silently give -1.
        return torch.where(torch.isnan(x), x, out)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_out * (x.abs() <= 1).to(grad_out.dtype)


def sign_ste(x: Tensor) -> Tensor:
    """Sign of ``x`` (same shape and dtype; ``x >= 0`` -> +1) with the clipped STE backward."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    return SignSTE.apply(x)


def channel_scale(weight: Tensor) -> Tensor:
    """XNOR-Net per-output-channel scale: ``alpha[o] = mean |weight[o, ...]|``, shape ``(O,)``.

    Differentiable (no detach): the gradient through ``alpha`` is part of the XNOR-Net update."""
    return weight.abs().flatten(1).mean(dim=1)


def _check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def _check_sizes(a_name: str, a: int, b_name: str, b: int) -> tuple[int, int]:
    """``(a, b)`` as ints, both >= 1 (the in/out sizes of a layer)."""
    if a < 1 or b < 1:
        raise ValueError(f"{a_name} and {b_name} must be >= 1, got {a}, {b}")
    return int(a), int(b)


Pair = Union[int, tuple[int, int]]


def _init_linear(m: nn.Module, in_features: int, out_features: int) -> None:
    """Set and check ``in_features`` / ``out_features`` (every linear layer of nn/ and snn/)."""
    m.in_features, m.out_features = _check_sizes("in_features", in_features, "out_features", out_features)


def _init_conv(m: nn.Module, in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair,
               padding: Pair, dilation: Pair) -> None:
    """Set and check the sizes and the geometry of a conv layer (every conv layer of nn/ and snn/):
    pairs of ints, zero padding given as numbers, kernel, stride and dilation >= 1."""
    m.in_channels, m.out_channels = _check_sizes("in_channels", in_channels, "out_channels", out_channels)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair of ints, got {padding!r}")
    geo = tuple(tuple(int(v) for v in _pair(p)) for p in (kernel_size, stride, padding, dilation))
    for name, val, lo in zip(("kernel_size", "stride", "padding", "dilation"), geo, (1, 1, 0, 1)):
        if min(val) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {val}")
    m.kernel_size, m.stride, m.padding, m.dilation = geo


def _check_groups(groups: object, in_channels: int, out_channels: int) -> int:
    """``groups`` as an int >= 1 dividing both channel counts."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
        )
    return groups


def _linear_repr(m: nn.Module) -> str:
    return f"in_features={m.in_features}, out_features={m.out_features}, bias={m.bias is not None}"


def _conv_repr(m: nn.Module) -> str:
    groups = getattr(m, "groups", 1)
    return (f"{m.in_channels}, {m.out_channels}, kernel_size={m.kernel_size}, stride={m.stride}, "
            f"padding={m.padding}, dilation={m.dilation}" + (f", groups={groups}" if groups != 1 else "")
            + f", bias={m.bias is not None}")


# --------------------------------------------------------------------------- layers


class _BinaryLayer(nn.Module):
    """Latent weight and bias parameters and their initialisation, shared by the binary layers."""

    def _init_params(self, weight_shape: tuple[int, ...], bias: bool, mode: str, device, dtype) -> None:
        self.mode = _check_mode(mode)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(*weight_shape, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(weight_shape[0], **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The initialisation of nn.Linear / nn.Conv2d; |w| <= 1/sqrt(fan_in) is well inside [-1, 1].
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def _copy_from(self, layer: nn.Module) -> "_BinaryLayer":
        """Copy ``layer``'s weight (and bias) into the latent parameters; returns ``self``."""
        self.weight.copy_(layer.weight)
        if layer.bias is not None:
            self.bias.copy_(layer.bias)
        return self


class BinaryLinear(_BinaryLayer):
    """Linear layer with binary weights for training.

    ``y = (a @ sign(W)^T) * alpha + bias`` with ``a = x`` (``mode="weights"``) or ``a = sign(x)``
    (``mode="both"``), ``alpha = mean|W|`` per output feature. ``x``: ``(..., in_features)``
    floating; ``y``: ``(..., out_features)``. ``weight`` is the latent real weight
    ``(out_features, in_features)``; keep it in ``[-1, 1]`` with :func:`clip_latent_weights_`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, mode: str = "weights",
                 device=None, dtype=None) -> None:
        super().__init__()
        _init_linear(self, in_features, out_features)
        self._init_params((self.out_features, self.in_features), bias, mode, device, dtype)

    @classmethod
    def from_linear(cls, layer: nn.Linear, mode: str = "weights") -> "BinaryLinear":
        """A binary layer whose latent weights (and bias) are copies of ``layer``'s."""
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, mode,
                  layer.weight.device, layer.weight.dtype)
        return out._copy_from(layer)

    def forward(self, x: Tensor) -> Tensor:
        a = sign_ste(x) if self.mode == "both" else x
        y = F.linear(a, sign_ste(self.weight)) * channel_scale(self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{_linear_repr(self)}, mode={self.mode!r}"


class BinaryConv2d(_BinaryLayer):
    """2-d convolution with binary weights for training (zero padding, optional groups).

    ``y = conv2d(a, sign(W), groups) * alpha[o] + bias[o]`` with ``a = x`` (``mode="weights"``) or
    ``a = sign(x)`` (``mode="both"``; padded positions are 0 after the sign, i.e. they contribute
    nothing). ``x``: ``(N, C, H, W)``; ``weight``: latent ``(O, C/groups, kh, kw)``;
    ``alpha = mean|W|`` over ``(C/groups, kh, kw)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair = 1,
                 padding: Pair = 0, dilation: Pair = 1, bias: bool = False, mode: str = "weights",
                 device=None, dtype=None, groups: int = 1) -> None:
        super().__init__()
        _init_conv(self, in_channels, out_channels, kernel_size, stride, padding, dilation)
        self.groups = _check_groups(groups, self.in_channels, self.out_channels)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._init_params(shape, bias, mode, device, dtype)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, mode: str = "weights") -> "BinaryConv2d":
        """A binary conv whose latent weights (and bias) are copies of ``layer``'s.

        Only ``padding_mode="zeros"`` and integer padding are supported (that is what
        :func:`kdengine.ops.binary_conv2d` computes); anything else is a ValueError. Groups are
        kept."""
        if layer.padding_mode != "zeros":
            raise ValueError(
                f"only padding_mode='zeros' convolutions can be binarized, got {layer.padding_mode!r}"
            )
        if isinstance(layer.padding, str):
            raise ValueError(
                f"only integer padding can be binarized, got padding={layer.padding!r}; "
                "give the padding as numbers"
            )
        out = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.bias is not None, mode, layer.weight.device, layer.weight.dtype,
                  groups=layer.groups)
        return out._copy_from(layer)

    def forward(self, x: Tensor) -> Tensor:
        a = sign_ste(x) if self.mode == "both" else x
        y = F.conv2d(a, sign_ste(self.weight), None, self.stride, self.padding, self.dilation, self.groups)
        y = y * channel_scale(self.weight).view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"{_conv_repr(self)}, mode={self.mode!r}"


# --------------------------------------------------------------------------- model helpers


def binary_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every :class:`BinaryLinear` / :class:`BinaryConv2d` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BinaryLinear, BinaryConv2d))]


def _set_child(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def binarize_model(
    model: nn.Module,
    mode: str = "weights",
    keep_first_last: bool = True,
    *,
    exclude: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Replace the ``nn.Linear`` / ``nn.Conv2d`` layers of ``model`` by binary ones.

    Args:
        model: any module. Only modules whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` are
            candidates (subclasses such as attention projections are left alone, since their
            owners read ``.weight`` directly).
        mode: ``"weights"`` (binary weights, real activations) or ``"both"``.
        keep_first_last: leave the first and the last candidate (in registration order, which
            is execution order for ``nn.Sequential``) in full precision, as XNOR-Net and
            docs/papers.md section 3 do.
        exclude: names (as in ``model.named_modules()``) to leave in full precision too.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The binarized model; latent weights start as copies of the float weights, clipped to
        ``[-1, 1]``. Raises ValueError for a convolution the binary op cannot express
        (non-zero padding mode, string padding): exclude it explicitly. Grouped and depthwise
        convolutions are binarized with their groups.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_mode(mode)
    exclude = set(exclude)
    if not inplace:
        model = copy.deepcopy(model)
    names = set(dict(model.named_modules()))
    unknown = exclude - names
    if unknown:
        raise ValueError(f"exclude names modules that are not in the model: {sorted(unknown)}")
    candidates = [
        n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)
    ]
    keep = set(exclude)
    if keep_first_last and candidates:
        keep.update({candidates[0], candidates[-1]})
    todo = [n for n in candidates if n not in keep]
    if not todo:
        warnings.warn("binarize_model: no layer was binarized (too few Linear/Conv2d layers)", stacklevel=2)
    for name in todo:
        layer = model.get_submodule(name)
        try:
            if type(layer) is nn.Linear:
                new = BinaryLinear.from_linear(layer, mode=mode)
            else:
                new = BinaryConv2d.from_conv(layer, mode=mode)
        except ValueError as exc:
            raise ValueError(f"cannot binarize layer {name!r}: {exc}; pass exclude=[{name!r}]") from exc
        _set_child(model, name, new)
    clip_latent_weights_(model)
    return model


@torch.no_grad()
def clip_latent_weights_(model: nn.Module, bound: float = 1.0) -> nn.Module:
    """Clip the latent weights of every binary layer of ``model`` to ``[-bound, bound]`` in place
    (BinaryNet; call it after each ``optimizer.step()``). Returns ``model``."""
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    for _, m in binary_layers(model):
        m.weight.clamp_(-bound, bound)
    return model
