"""Spike x binary-weight layers on the packed AND-popcount kernel (:func:`kdengine.ops.spike_matmul`).

A converted binary-weight layer computes ``y = (s @ sign(W)^T) * scale + bias`` where ``s`` are the
0/1 spikes of the previous layer: spikes are bits, weights are sign bits, and
``sum_k s_k sign(W_k) = popcount(s) - 2 popcount(s AND w_neg)`` is exact in int32. No float
matmul runs for these layers; the float work left is the per-channel epilogue ``* scale + bias``.

The layers hold the same buffers as the packed layers of :mod:`kdengine.nn.packed`
(``weight_bits`` = :func:`kdengine.ops.pack_signs` of the weight flattened to ``(O, K)``, ``scale``,
``bias``) and, like them, run through :meth:`inference_plan` (:mod:`kdengine.nn.plan`), which
``forward`` and :mod:`kdengine.infer` share.

Layout of the convolution (why it is not a float ``unfold``): the spike map is packed along the
*channels* of each pixel and the im2col gathers words, not values
(:class:`kdengine.nn.plan.ChannelWordConv` on :func:`kdengine.ops.binary.channel_words`): 32x less
data to move than unfolding the float spike map. Zero padding needs no correction here, unlike the
XNOR convolution: a padded position is "no spike", bit 0, and contributes exactly 0 to
``popcount(s) - 2 popcount(s AND w)``; the channel padding bits of a word are 0 in the spikes, so
they contribute 0 whatever the weight bits hold.

Memory per call: spike words ``T*B*H*W*ceil(C/32)*4`` bytes, im2col words ``kh*kw`` times that
(over the output positions), int32 output ``T*B*OH*OW*O*4``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine.nn.binary import Pair, _conv_repr, _init_conv, _init_linear, _linear_repr
from kdengine.nn.packed import PackedLayerBase
from kdengine.nn.plan import ChannelWordConv, LayerPlan, inference_only, resolve_backend
from kdengine.ops.binary import ConvGeometry

__all__ = ["SpikingBinaryLinear", "SpikingBinaryConv2d"]


def _check_signs(w: Tensor, dims: int, shape: str) -> Tensor:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError("sign_weight must be a floating tensor of +-1 values")
    if w.dim() != dims:
        raise ValueError(f"sign_weight must be {shape}, got {tuple(w.shape)}")
    if not bool(((w == 1) | (w == -1)).all()):
        raise ValueError("sign_weight must contain only +1 and -1")
    return w


def _check_vec(name: str, t: Optional[Tensor], n: int) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of shape ({n},) or None")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t


def _check_input(x: object, dims: int, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of spikes {what}, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"x must have shape {what}, got {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"x must hold 0/1 spikes, got dtype {x.dtype}")
    return x


def _check_spike_values(x: Tensor) -> None:
    """Values other than 0/1 raise (the data part of the input check)."""
    if x.dtype != torch.bool:
        bad = (x != 0) & (x != 1)
        if bool(bad.any()):
            raise ValueError(
                f"x must contain only spikes (0 or 1), found {x[bad].flatten()[0].item()}; a "
                "binary spiking layer needs the output of spiking neurons as input"
            )


class _SpikingBase(PackedLayerBase):
    """Construction and the epilogue shared by the spiking binary layers."""

    def _init_spiking(self, out: int, k: int, bias: bool, backend: Optional[str], check_spikes: bool,
                      device) -> None:
        self._init_buffers(out, k, bias, device)
        self.backend = backend
        self.check_spikes = bool(check_spikes)

    @classmethod
    def _from(cls, layer: "_SpikingBase", sign_weight: Tensor, scale: Tensor,
              bias: Optional[Tensor]) -> "_SpikingBase":
        n = layer.weight_bits.shape[0]
        scale = _check_vec("scale", scale, n)
        if scale is None:
            raise TypeError(f"scale must be a floating tensor of shape ({n},)")
        layer._copy_weights(sign_weight.to(layer.weight_bits.device),
                            scale.to(layer.weight_bits.device),
                            None if bias is None else _check_vec("bias", bias, n).to(layer.weight_bits.device))
        return layer

    def _epilogue(self, dot: Tensor) -> Tensor:
        # int32 -> float32 is exact (|dot| <= K < 2^24); convert-then-scale in place is ~2x
        # faster on CPU than the mixed-dtype multiply
        y = dot.to(torch.float32).mul_(self.scale)
        return y if self.bias is None else y.add_(self.bias)


class SpikingBinaryLinear(_SpikingBase):
    """Linear layer of binary weights driven by spikes: ``y = (s @ sign(W)^T) * scale + bias``.

    ``SpikingBinaryLinear(in_features, out_features, bias=False)`` makes the buffers (weights +1,
    scale 1, bias 0); :meth:`from_signs` builds one from +-1 weights. Buffers: ``weight_bits`` int32
    ``(N, ceil(K/32))`` (bit 1 = -1, :func:`pack_signs`), ``scale`` float32 ``(N,)``, ``bias``
    float32 ``(N,)`` or None.

    ``forward(x)``: ``x`` ``(T, B, K)`` spikes (0/1, bool or any real dtype) -> float32
    ``(T, B, N)``. With ``check_spikes`` (default) any other value raises ValueError; the
    converter turns the check off where the input comes straight from IF neurons (it costs a
    pass over the input).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 backend: Optional[str] = None, check_spikes: bool = True, device=None) -> None:
        super().__init__()
        _init_linear(self, in_features, out_features)
        self._init_spiking(self.out_features, self.in_features, bias, backend, check_spikes, device)

    @classmethod
    def from_signs(cls, sign_weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None, *,
                   backend: Optional[str] = None, check_spikes: bool = True) -> "SpikingBinaryLinear":
        """The layer of the +-1 weights ``sign_weight`` ``(N, K)``, ``scale`` ``(N,)`` and
        ``bias`` ``(N,)`` or None."""
        w = _check_signs(sign_weight, 2, "(N, K)")
        layer = cls(w.shape[1], w.shape[0], bias is not None, backend=backend,
                    check_spikes=check_spikes, device=w.device)
        return cls._from(layer, w, scale, bias)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def inference_plan(self, x: Tensor, *, out_buffer: bool = False) -> LayerPlan:
        """The forward for ``x``'s signature (:mod:`kdengine.nn.plan`)."""
        x = _check_input(x, 3, f"(T, B, {self.in_features})")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features, got {tuple(x.shape)}")
        t, b = x.shape[0], x.shape[1]
        k, n, rows = self.in_features, self.out_features, x.shape[0] * x.shape[1]
        out_shape = (t, b, n)
        if rows == 0:
            return LayerPlan(lambda x: torch.zeros(out_shape, device=x.device), out_shape, "empty batch")
        pack = _dispatch.implementation("binary_pack", resolve_backend("binary_pack", x.device, self.backend))
        gemm = _dispatch.implementation("spike_matmul", resolve_backend("spike_matmul", x.device, self.backend))
        w, check = self.weight_bits.contiguous(), self.check_spikes

        def run(x: Tensor) -> Tensor:
            if check:
                _check_spike_values(x)
            s = x if x.dtype == torch.bool else x != 0
            dot = gemm(pack(s.reshape(rows, k).contiguous(), True), w, k)  # int32 (T*B, N), exact
            return self._epilogue(dot).reshape(out_shape)

        return LayerPlan(inference_only(run, "SpikingBinaryLinear"), out_shape,
                         "spiking binary linear, and-popcount kernel")

    def extra_repr(self) -> str:
        return f"{_linear_repr(self)}, kernel=spike_matmul"


class SpikingBinaryConv2d(_SpikingBase):
    """2-d convolution of binary weights driven by spikes (``groups=1``, zero padding).

    ``y = conv2d(s, sign(W)) * scale[o] + bias[o]`` computed as channel-packed spike words,
    im2col of words and the AND-popcount GEMM (see the module doc).
    ``SpikingBinaryConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
    bias)`` as ``nn.Conv2d``; :meth:`from_signs` builds one from +-1 weights. Buffers as
    :class:`SpikingBinaryLinear` (``weight_bits`` of the weight flattened to ``(O, C*kh*kw)``).

    ``forward(x)``: ``x`` ``(T, B, C, H, W)`` spikes (0/1; ``check_spikes`` as in
    :class:`SpikingBinaryLinear`) -> float32 ``(T, B, O, OH, OW)``, laid out channels-last in
    memory (a permuted view of the GEMM output, no copy; torch's pooling runs on it natively).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair = 1,
                 padding: Pair = 0, dilation: Pair = 1, bias: bool = False, *,
                 backend: Optional[str] = None, check_spikes: bool = True, device=None) -> None:
        super().__init__()
        _init_conv(self, in_channels, out_channels, kernel_size, stride, padding, dilation)
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_spiking(self.out_channels, k, bias, backend, check_spikes, device)

    @classmethod
    def from_signs(cls, sign_weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                   stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1, *,
                   backend: Optional[str] = None, check_spikes: bool = True) -> "SpikingBinaryConv2d":
        """The layer of the +-1 weights ``sign_weight`` ``(O, C, kh, kw)``, ``scale`` ``(O,)``
        and ``bias`` ``(O,)`` or None."""
        w = _check_signs(sign_weight, 4, "(O, C, kh, kw)")
        o, c, kh, kw = w.shape
        layer = cls(c, o, (kh, kw), stride, padding, dilation, bias is not None, backend=backend,
                    check_spikes=check_spikes, device=w.device)
        return cls._from(layer, w, scale, bias)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return ConvGeometry(1, self.in_channels, h, w, self.kernel_size, self.stride, self.padding,
                            self.dilation).out_hw

    def inference_plan(self, x: Tensor, *, out_buffer: bool = False) -> LayerPlan:
        """The forward for ``x``'s signature (:mod:`kdengine.nn.plan`)."""
        x = _check_input(x, 5, f"(T, B, {self.in_channels}, H, W)")
        t, b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (dim 2), got {tuple(x.shape)}")
        geo = ConvGeometry(t * b, c, h, w, self.kernel_size, self.stride, self.padding, self.dilation)
        (oh, ow), o = geo.out_hw, self.out_channels
        if oh < 1 or ow < 1:
            raise ValueError(f"input {h}x{w} is smaller than the (dilated) kernel")
        out_shape = (t, b, o, oh, ow)
        if t * b == 0:
            return LayerPlan(lambda x: torch.zeros(out_shape, device=x.device), out_shape, "empty batch")
        conv = ChannelWordConv(self.sign_weight(), geo, resolve_backend("spike_matmul", x.device, self.backend),
                               spikes=True)
        check = self.check_spikes

        def run(x: Tensor) -> Tensor:
            if check:
                _check_spike_values(x)
            # the channel-word packer stores sign bits (bit 1 = negative): -s has bit 1 = spike,
            # and -0.0 is not negative, so "no spike" and the zero padding words are bit 0
            if x.is_floating_point():
                neg = x.neg()
            elif x.dtype == torch.bool:  # 1 byte per value until the float: ~2.5x faster
                neg = x.view(torch.int8).neg().to(torch.float32)
            else:
                neg = x.to(torch.float32).neg_()
            y = self._epilogue(conv.counts(neg.reshape(t * b, c, h, w), torch.float32))
            return y.view(t, b, oh, ow, o).permute(0, 1, 4, 2, 3)

        return LayerPlan(inference_only(run, "SpikingBinaryConv2d"), out_shape,
                         "spiking binary conv, and-popcount GEMM (weights repacked once)",
                         precomputed_bytes=conv.nbytes)

    def extra_repr(self) -> str:
        return f"{_conv_repr(self)}, kernel=spike_matmul"
