"""Packed inference layers and :func:`pack_model`: a trained binary model -> 1 bit per weight.

A :class:`PackedBinaryLinear` / :class:`PackedBinaryConv2d` stores

* ``weight_bits``: int32 ``(O, ceil(K / 32))``, the signs of the latent weights as produced by
  :func:`kdengine.ops.pack_signs` (bit 1 = -1, bit 0 = +1, padding bits 0); ``K = in_features``
  or ``C * kh * kw`` (the weight flattened as ``W.flatten(1)`` of ``(O, C, kh, kw)``). That is 32x
  fewer bytes than the fp32 weight (up to the padding of the last word);
* ``scale``: float32 ``(O,)``, the XNOR-Net scale ``mean|W|`` of each output channel;
* ``bias``: float32 ``(O,)`` or absent.

They are buffers (not parameters: nothing is trained any more), so ``state_dict``, ``.to()`` and
:mod:`kdengine.serialize` see them.

How each mode runs:

* ``mode="both"`` (binary activations): :func:`kdengine.ops.binary_linear` /
  :func:`kdengine.ops.binary_conv2d`, i.e. the XNOR-popcount kernels; they take ``sign(x)`` of the
  real input themselves (``x >= 0`` -> +1) and zero-pad after the sign, as the training layer does.
  Their epilogue is the training layer's arithmetic (exact integer dot -> float32, ``* scale``,
  ``+ bias``, two roundings), and the training layer's float convolution of +-1 values is exact
  with the usual direct / GEMM algorithms, so outputs match the training model bit for bit in
  practice (the tests allow float rounding, in case a convolution algorithm is not exact). One
  difference: a NaN input raises ValueError here (a NaN has no sign bit), where the training
  layer propagates the NaN.
* ``mode="weights"`` (real activations, binary weights): the XNOR kernel does not apply, because the
  activations are not +-1. The layer unpacks its weights once into a float +-1 tensor (cached; it is
  rebuilt only if ``weight_bits`` changes, moves device or dtype) and runs a float matmul /
  convolution followed by ``* scale + bias``: the same float operations as the training layer, so
  outputs match it bit for bit. The packed form is what is stored and shipped (32x smaller); the
  run-time copy is float, so in this mode the *memory at run time* is not reduced.
"""
from __future__ import annotations

import copy
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from kdengine.nn.binary import BinaryConv2d, BinaryLinear, _check_mode, channel_scale
from kdengine.ops.binary import PackedSigns, binary_conv2d, binary_linear, pack_signs

__all__ = [
    "PackedBinaryLinear",
    "PackedBinaryConv2d",
    "pack_model",
    "state_nbytes",
    "n_words",
]


def n_words(k: int) -> int:
    """Number of int32 words holding ``k`` sign bits."""
    return (int(k) + 31) // 32


class _PackedBase(nn.Module):
    """Shared buffers, the cached unpacked weight and the checks of the packed layers."""

    def _init_buffers(self, out: int, k: int, bias: bool, device) -> None:
        self.k = int(k)
        self.register_buffer("weight_bits", torch.zeros(out, n_words(k), dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.ones(out, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out, dtype=torch.float32, device=device))
        else:
            self.bias = None
        self.backend: Optional[str] = None
        self._dense_cache: Optional[tuple[Tensor, int, Tensor]] = None

    @property
    def packed_weight(self) -> PackedSigns:
        """The weights as :class:`kdengine.ops.PackedSigns` (logical shape ``(O, K)``)."""
        return PackedSigns(self.weight_bits, self.k)

    def _dense_pm1(self, dtype: torch.dtype) -> Tensor:
        """Unpacked +-1 weights ``(O, K)`` in ``dtype``, cached until the bits change."""
        bits = self.weight_bits
        c = self._dense_cache
        # The cache holds the bits tensor itself (identity + in-place version counter), so a
        # replaced, reloaded or moved buffer is always noticed.
        if c is None or c[0] is not bits or c[1] != bits._version or c[2].dtype != dtype:
            with torch.no_grad():
                dense = self.packed_weight.unpack(dtype)
            self._dense_cache = (bits, bits._version, dense)
            c = self._dense_cache
        return c[2]

    def prepare(self) -> "_PackedBase":
        """Build the run-time form now (``mode="weights"``: the unpacked +-1 weights)."""
        if self.mode == "weights":
            self._dense_pm1(torch.float32)
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        super()._load_from_state_dict(*args, **kwargs)
        self._dense_cache = None


class PackedBinaryLinear(_PackedBase):
    """Inference linear layer with 1-bit weights: ``y = (a @ sign(W)^T) * scale + bias``.

    ``a = sign(x)`` via the XNOR-popcount op (``mode="both"``) or ``a = x`` with a float matmul
    on the cached unpacked weights (``mode="weights"``). ``x``: ``(..., in_features)`` floating;
    ``y``: ``(..., out_features)`` float32 (``mode="both"``) or ``x``'s dtype (``"weights"``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: str = "weights",
        bias: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.mode = _check_mode(mode)
        self._init_buffers(self.out_features, self.in_features, bias, device)

    @classmethod
    @torch.no_grad()
    def from_binary(cls, layer: BinaryLinear) -> "PackedBinaryLinear":
        """Pack a trained :class:`BinaryLinear` (its latent weights' signs, scale and bias)."""
        if not isinstance(layer, BinaryLinear):
            raise TypeError(f"layer must be a BinaryLinear, got {type(layer).__name__}")
        w = layer.weight.detach()
        out = cls(layer.in_features, layer.out_features, layer.mode, layer.bias is not None, w.device)
        out.weight_bits.copy_(pack_signs(w).bits)
        # The scale is computed by the same expression as in training, so it is the same float.
        out.scale.copy_(channel_scale(w).to(torch.float32))
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach().to(torch.float32))
        return out

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}"
            )
        if self.mode == "both":
            return binary_linear(x, self.packed_weight, self.scale, self.bias, backend=self.backend)
        y = F.linear(x, self._dense_pm1(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode!r}"
        )


class PackedBinaryConv2d(_PackedBase):
    """Inference 2-d convolution with 1-bit weights (``groups=1``, zero padding).

    ``y = conv2d(a, sign(W)) * scale[o] + bias[o]``; ``a = sign(x)`` via
    :func:`kdengine.ops.binary_conv2d` (``mode="both"``; padded positions contribute 0), or
    ``a = x`` with ``F.conv2d`` on the cached unpacked weights (``mode="weights"``).
    ``x``: ``(N, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, tuple[int, int]],
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[int, tuple[int, int]] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        mode: str = "weights",
        bias: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}"
            )
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = tuple(int(v) for v in _pair(kernel_size))
        self.stride = tuple(int(v) for v in _pair(stride))
        self.padding = tuple(int(v) for v in _pair(padding))
        self.dilation = tuple(int(v) for v in _pair(dilation))
        for name, val, lo in (
            ("kernel_size", self.kernel_size, 1),
            ("stride", self.stride, 1),
            ("padding", self.padding, 0),
            ("dilation", self.dilation, 1),
        ):
            if min(val) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {val}")
        self.mode = _check_mode(mode)
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_buffers(self.out_channels, k, bias, device)

    @classmethod
    @torch.no_grad()
    def from_binary(cls, layer: BinaryConv2d) -> "PackedBinaryConv2d":
        """Pack a trained :class:`BinaryConv2d` (signs of ``W.flatten(1)``, scale, bias)."""
        if not isinstance(layer, BinaryConv2d):
            raise TypeError(f"layer must be a BinaryConv2d, got {type(layer).__name__}")
        w = layer.weight.detach()
        out = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.mode,
            layer.bias is not None,
            w.device,
        )
        out.weight_bits.copy_(pack_signs(w.flatten(1)).bits)
        out.scale.copy_(channel_scale(w).to(torch.float32))
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach().to(torch.float32))
        return out

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.mode == "both":
            return binary_conv2d(
                x,
                self.packed_weight,
                self.kernel_size,
                self.scale,
                self.bias,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                backend=self.backend,
            )
        w = self._dense_pm1(x.dtype).view(self.out_channels, self.in_channels, *self.kernel_size)
        y = F.conv2d(x, w, None, self.stride, self.padding, self.dilation)
        y = y * self.scale.to(x.dtype).view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, mode={self.mode!r}"
        )


def pack_model(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """An inference copy of ``model`` whose binary layers hold packed weights.

    Every :class:`BinaryLinear` / :class:`BinaryConv2d` becomes a :class:`PackedBinaryLinear` /
    :class:`PackedBinaryConv2d`; every other module (full-precision first/last layers, ReLU,
    pooling, dropout, flatten, batch norm...) is deep-copied as it is. The result is in eval mode
    with ``requires_grad=False`` everywhere; ``model`` is not modified. ``backend`` is passed to
    the packed ops (``None``: the dispatcher's default).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (BinaryLinear, BinaryConv2d)):
        packed = _pack_layer(model)
        packed.backend = backend
        return packed.eval().prepare()
    out = copy.deepcopy(model)
    targets = [n for n, m in out.named_modules() if isinstance(m, (BinaryLinear, BinaryConv2d))]
    for name in targets:
        layer = out.get_submodule(name)
        packed = _pack_layer(layer)
        packed.backend = backend
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, packed.prepare())
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _pack_layer(layer: nn.Module) -> nn.Module:
    if isinstance(layer, BinaryLinear):
        return PackedBinaryLinear.from_binary(layer)
    return PackedBinaryConv2d.from_binary(layer)


def state_nbytes(model: nn.Module) -> int:
    """Bytes of everything in ``model.state_dict()`` (parameters and persistent buffers)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel())
        if key in seen and t.numel() > 0:
            continue  # shared (tied) tensors count once
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
