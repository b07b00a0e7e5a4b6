"""Spike x binary-weight layers on the packed AND-popcount kernel (:func:`kdengine.ops.spike_matmul`).

A converted binary-weight layer computes ``y = (s @ sign(W)^T) * scale + bias`` where ``s`` are the
0/1 spikes of the previous layer: spikes are bits, weights are sign bits, and
``sum_k s_k sign(W_k) = popcount(s) - 2 popcount(s AND w_neg)`` is exact in int32. No float
matmul runs for these layers; the float work left is the per-channel epilogue ``* scale + bias``.

Layout of the convolution (why it is not a float ``unfold``): the spike map is packed along the
*channels* of each pixel (NHWC words, ``ceil(C/32)`` int32 words per pixel), spatially padded with
all-zero words, and the im2col gathers words, not values: 32x less data to move than unfolding the
float spike map. The weights are repacked once to the same ``(kh, kw, C)`` word order. Zero
padding needs no correction here, unlike the XNOR convolution: a padded position is "no spike",
bit 0, and contributes exactly 0 to ``popcount(s) - 2 popcount(s AND w)``; the channel padding bits
of a word are 0 in the spikes, so they contribute 0 whatever the weight bits hold.

Memory per call: spike words ``T*B*H*W*ceil(C/32)*4`` bytes, im2col words ``kh*kw`` times that
(over the output positions), int32 output ``T*B*OH*OW*O*4``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from kdengine.ops.binary import PackedSigns, pack_signs, pack_spikes, spike_matmul

__all__ = ["SpikingBinaryLinear", "SpikingBinaryConv2d"]


def _words(k: int) -> int:
    return (int(k) + 31) // 32


def _check_signs(w: Tensor) -> Tensor:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError("sign_weight must be a floating tensor of +-1 values")
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
    return t.detach().to(torch.float32).clone()


def _spike_bits(x: object, dims: int, what: str, check: bool) -> Tensor:
    """``x`` as a bool tensor (spike = True); with ``check``, values other than 0/1 raise."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of spikes {what}, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"x must have shape {what}, got {tuple(x.shape)}")
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise TypeError(f"x must hold 0/1 spikes, got dtype {x.dtype}")
    if check:
        bad = (x != 0) & (x != 1)
        if bool(bad.any()):
            raise ValueError(
                f"x must contain only spikes (0 or 1), found {x[bad].flatten()[0].item()}; a "
                "binary spiking layer needs the output of spiking neurons as input"
            )
    return x != 0



def _register_epilogue(m: nn.Module, scale: Optional[Tensor], bias: Optional[Tensor], n: int,
                       backend: Optional[str], check_spikes: bool) -> None:
    """The per-output-channel scale and optional bias buffers and the run options shared by the
    spiking binary layers."""
    m.register_buffer("scale", _check_vec("scale", scale, n))
    b = _check_vec("bias", bias, n)
    if b is not None:
        m.register_buffer("bias", b)
    else:
        m.bias = None
    m.backend = backend
    m.check_spikes = bool(check_spikes)

class SpikingBinaryLinear(nn.Module):
    """Linear layer of binary weights driven by spikes: ``y = (s @ sign(W)^T) * scale + bias``.

    Buffers: ``weight_bits`` int32 ``(N, ceil(K/32))`` (bit 1 = -1, :func:`pack_signs`),
    ``scale`` float32 ``(N,)``, ``bias`` float32 ``(N,)`` or None.

    ``forward(x)``: ``x`` ``(T, B, K)`` spikes (0/1, bool or any real dtype) -> float32
    ``(T, B, N)``. With ``check_spikes`` (default) any other value raises ValueError; the
    converter turns the check off where the input comes straight from IF neurons (it costs a
    pass over the input).
    """

    def __init__(self, sign_weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None, *,
                 backend: Optional[str] = None, check_spikes: bool = True) -> None:
        super().__init__()
        w = _check_signs(sign_weight)
        if w.dim() != 2:
            raise ValueError(f"sign_weight must be (N, K), got {tuple(w.shape)}")
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.register_buffer("weight_bits", pack_signs(w.detach().to(torch.float32)).bits)
        _register_epilogue(self, scale, bias, self.out_features, backend, check_spikes)

    @property
    def packed_weight(self) -> PackedSigns:
        return PackedSigns(self.weight_bits, self.in_features)

    def sign_weight(self) -> Tensor:
        """The +-1 weights ``(N, K)`` float32 (unpacked)."""
        return self.packed_weight.unpack(torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        x = _spike_bits(x, 3, f"(T, B, {self.in_features})", self.check_spikes)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features, got {tuple(x.shape)}")
        t, b = x.shape[0], x.shape[1]
        s = pack_spikes(x.reshape(t * b, self.in_features), backend=self.backend)
        dot = spike_matmul(s, self.packed_weight, backend=self.backend)  # int32 (T*B, N), exact
        # int32 -> float32 is exact (|dot| <= K < 2^24); convert-then-scale in place is ~2x
        # faster on CPU than the mixed-dtype multiply
        y = dot.to(torch.float32).mul_(self.scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(t, b, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel=spike_matmul")


class SpikingBinaryConv2d(nn.Module):
    """2-d convolution of binary weights driven by spikes (``groups=1``, zero padding).

    ``y = conv2d(s, sign(W)) * scale[o] + bias[o]`` computed as channel-packed spike words,
    im2col of words and :func:`spike_matmul` (see the module doc). Buffers: ``weight_words`` int32
    ``(O, kh*kw*ceil(C/32))`` in (kh, kw, C) word order, ``scale`` ``(O,)``, ``bias`` ``(O,)`` or
    None.

    ``forward(x)``: ``x`` ``(T, B, C, H, W)`` spikes (0/1; ``check_spikes`` as in
    :class:`SpikingBinaryLinear`) -> float32 ``(T, B, O, OH, OW)``, laid out channels-last in
    memory (a permuted view of the GEMM output, no copy; torch's pooling runs on it natively).
    """

    def __init__(
        self,
        sign_weight: Tensor,
        scale: Tensor,
        bias: Optional[Tensor] = None,
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[int, tuple[int, int]] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        *,
        backend: Optional[str] = None,
        check_spikes: bool = True,
    ) -> None:
        super().__init__()
        w = _check_signs(sign_weight)
        if w.dim() != 4:
            raise ValueError(f"sign_weight must be (O, C, kh, kw), got {tuple(w.shape)}")
        o, c, kh, kw = (int(v) for v in w.shape)
        self.out_channels, self.in_channels, self.kernel_size = o, c, (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"bad geometry stride={stride}, padding={padding}, dilation={dilation}")
        # (O, kh, kw, C) -> sign words along C per tap -> (O, kh*kw*cw); channel padding bits 0
        wt = w.detach().to(torch.float32).permute(0, 2, 3, 1).reshape(o * kh * kw, c)
        words = pack_signs(wt).bits.reshape(o, kh * kw * _words(c))
        self.register_buffer("weight_words", words.contiguous())
        _register_epilogue(self, scale, bias, o, backend, check_spikes)

    def sign_weight(self) -> Tensor:
        """The +-1 weights ``(O, C, kh, kw)`` float32 (unpacked)."""
        o, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        cw = _words(c)
        pm = PackedSigns(self.weight_words.reshape(o * kh * kw, cw), cw * 32).unpack(torch.float32)
        return pm[:, :c].reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def forward(self, x: Tensor) -> Tensor:
        x = _spike_bits(x, 5, f"(T, B, {self.in_channels}, H, W)", self.check_spikes)
        t, b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels (dim 2), got {tuple(x.shape)}")
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh, ow = self.out_hw(h, w)
        if oh < 1 or ow < 1:
            raise ValueError(f"input {h}x{w} is smaller than the (dilated) kernel")
        n = t * b
        cw = _words(c)
        pix = x.reshape(n, c, h, w).permute(0, 2, 3, 1).reshape(n * h * w, c)
        words = pack_spikes(pix, backend=self.backend).bits.reshape(n, h, w, cw)
        if ph or pw:
            words = F.pad(words, (0, 0, pw, pw, ph, ph))  # all-zero words: no spikes, contribute 0
        win = words.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        cols = win[:, :oh, :ow].permute(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * cw)
        k = kh * kw * cw * 32
        s = PackedSigns(cols.contiguous(), k, spikes=True)
        wp = PackedSigns(self.weight_words, k)
        dot = spike_matmul(s, wp, backend=self.backend)  # int32 (n*OH*OW, O), exact
        y = dot.to(torch.float32).mul_(self.scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(t, b, oh, ow, self.out_channels).permute(0, 1, 4, 2, 3)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, kernel=spike_matmul")
