"""Binary conv2d: the entry point, its geometry, and the conv pieces every kernel backend shares
(per-pixel channel words, the weights in (kh, kw, C) word order, the border correction of zero
padding, and the cached per-weight plan that runs the conv as pack + XNOR GEMM)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine._checks import same_device
from kdengine.ops.binary import reference as ref
from kdengine.ops.binary.op import (
    IntPair,
    PackedSigns,
    _check_channel_vec,
    _check_float,
    _check_no_func_grad,
    _check_packed,
    _cpu_ops,
    _native_has,
    _pair,
    _rows,
    _words,
    check_k_limit,
)


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one binary conv2d: input (B, C, H, W), kernel (kh, kw), output (OH, OW)."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        oh = (self.height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (self.width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return oh, ow


def binary_conv2d(
    x: Tensor,
    weight: PackedSigns,
    kernel_size: IntPair,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Binary 2-D convolution: ``conv2d(sign(x), sign(W)) * scale[o] + bias[o]``.

    Zero padding is exact: a padded position contributes 0 (not +-1), as in ``torch.conv2d`` on
    the +-1 tensor; the kernels count padded taps as +1 and subtract a per-border correction
    (module docstring). No groups.

    Args:
        x: ``(B, C, H, W)`` float32/float64/float16/bfloat16; NaN raises ValueError.
        weight: ``pack_signs(W.flatten(1))`` of an ``(O, C, kh, kw)`` weight: packed ``(O, C*kh*kw)``
            in (C, kh, kw) order.
        kernel_size: ``kh`` or ``(kh, kw)``.
        scale, bias: optional ``(O,)``.
        stride, padding, dilation: int or pair (padding >= 0, the others >= 1).

    Returns:
        ``(B, O, OH, OW)`` in x's dtype, not requiring grad.
    """
    x = _check_float("x", x)
    _check_no_func_grad("binary_conv2d", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    w = _check_packed("weight", weight, spikes=False)
    w2 = _rows(w, "weight")
    kh, kw = _pair("kernel_size", kernel_size, 1)
    geo = ConvGeometry(
        *x.shape, kernel=(kh, kw), stride=_pair("stride", stride, 1),
        padding=_pair("padding", padding, 0), dilation=_pair("dilation", dilation, 1),
    )
    if min(x.shape[1:]) == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); expected C, H, W >= 1")
    if w.k != geo.channels * kh * kw:
        raise ValueError(
            f"K mismatch: weight has K={w.k} but x has C={geo.channels} channels and the kernel is "
            f"{kh}x{kw}, so K must be C*kh*kw={geo.channels * kh * kw}"
        )
    same_device("weight", w, "x", x)
    oh, ow = geo.out_hw
    if oh < 1 or ow < 1:
        raise ValueError(
            f"the kernel (size {(kh, kw)}, dilation {geo.dilation}) does not fit the padded "
            f"input {tuple(x.shape[2:])} + padding {geo.padding}"
        )
    # the GEMM runs over kh*kw words of ceil(C/32) words each: its K (>= C*kh*kw) must fit too
    check_k_limit(kh * kw * 32 * _words(geo.channels), "the conv GEMM's K = kh*kw*32*ceil(C/32)")
    n = w2.shape[0]
    sc = _check_channel_vec("scale", scale, n, x)
    bi = _check_channel_vec("bias", bias, n, x)
    if geo.batch == 0 or n == 0:
        return torch.zeros((geo.batch, n, oh, ow), dtype=x.dtype, device=x.device)
    name = _dispatch.resolve("binary_conv2d", x.device, backend)
    with torch.no_grad():
        return _dispatch.implementation("binary_conv2d", name)(x.detach(), w2, geo, sc, bi)


# --------------------------------------------------------------------------- shared conv pieces


def channel_words(x: Tensor, geo: ConvGeometry, backend: str) -> Tensor:
    """Sign bits of ``x`` packed along channels per pixel (NHWC, LCE-style), spatially zero-padded
    with words of +1 bits, as im2col rows: int32 ``(B*OH*OW, kh*kw*ceil(C/32))`` in (kh, kw, C)
    order; channel padding bits are 0. Raises on NaN."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    if backend == "cpu" and x.device.type == "cpu" and _native_has("binary_conv_words"):
        # the same words in one C++ pass (csrc/binary/conv_words.cpp)
        return _cpu_ops().binary_conv_words(x, kh, kw, sh, sw, ph, pw, dh, dw)
    b, c, h, w = x.shape
    cw = _words(c)
    # the float sign packer of every backend raises on NaN itself: no separate isnan pass
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c).contiguous()
    words = _dispatch.implementation("binary_pack", backend)(rows, False).reshape(b, h, w, cw)
    if ph or pw:
        words = torch.nn.functional.pad(words, (0, 0, pw, pw, ph, ph))  # 0 words: +1, corrected later
    oh, ow = geo.out_hw
    # windows of the dilated extent, every dilation-th tap: (B, OH, OW, Cw, kh, kw)
    p = words.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    return p[:, :oh, :ow].permute(0, 1, 2, 4, 5, 3).reshape(b * oh * ow, kh * kw * cw)


def weight_channel_words(w_bits: Tensor, geo: ConvGeometry, backend: str) -> Tensor:
    """The packed ``(O, C*kh*kw)`` weights (C, kh, kw order) repacked to the (kh, kw, C) word order
    of :func:`channel_words`: int32 ``(O, kh*kw*ceil(C/32))``, channel padding bits 0."""
    (kh, kw), c = geo.kernel, geo.channels
    neg = ref.unpack_reference(w_bits, c * kh * kw, spikes=True, dtype=torch.uint8)  # 1 = -1
    neg = neg.reshape(-1, c, kh, kw).permute(0, 2, 3, 1).reshape(-1, c)
    words = _dispatch.implementation("binary_pack", backend)(neg.contiguous(), True)
    return words.reshape(w_bits.shape[0], kh * kw * _words(c))


def border_correction(w_bits: Tensor, geo: ConvGeometry) -> Optional[Tensor]:
    """``(O, OH, OW)`` sum of sign(W) over the taps of each output position that fall in the
    zero padding (what counting padded taps as +1 added), or None without padding."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    if ph == 0 and pw == 0:
        return None
    oh, ow = geo.out_hw
    o = w_bits.shape[0]
    dev = w_bits.device
    wsum = ref.unpack_reference(w_bits, geo.channels * kh * kw).reshape(o, geo.channels, kh, kw).sum(1)
    rows = torch.arange(oh, device=dev)[:, None] * sh - ph + torch.arange(kh, device=dev)[None] * dh
    cols = torch.arange(ow, device=dev)[:, None] * sw - pw + torch.arange(kw, device=dev)[None] * dw
    rin = ((rows >= 0) & (rows < geo.height)).to(torch.float64)  # (OH, kh)
    cin = ((cols >= 0) & (cols < geo.width)).to(torch.float64)  # (OW, kw)
    inside = torch.einsum("oij,hi,wj->ohw", wsum, rin, cin)
    return torch.round(wsum.sum((1, 2))[:, None, None] - inside).to(torch.int32)


class ConvPlan:
    """What a binary conv needs besides its input, computed once per (weights, geometry, backend):
    the weights repacked to the (kh, kw, C) word order of :func:`channel_words`, the GEMM's
    ``Kp = kh*kw*32*ceil(C/32)``, and the correction subtracted from the GEMM's counts -- the
    padding border term (:func:`border_correction`) plus ``Kp - K`` (channel padding bits are 0 in
    both operands, so XNOR counts them as agreements) -- laid out as ``(OH*OW, O)``.

    :meth:`run` does the rest per input: channel words, XNOR GEMM on ``backend``, and the epilogue
    in place in the GEMM's (pixels, O) layout. The integer counts and corrections are exact in the
    compute dtype (|values| < 2^24), then ``* scale`` and ``+ bias`` round separately, exactly as
    :func:`kdengine.ops.binary.reference.epilogue`. The batch size may change between calls.
    """

    def __init__(self, w_bits: Tensor, geo: ConvGeometry, backend: str) -> None:
        (kh, kw), c = geo.kernel, geo.channels
        self.geo, self.backend = geo, backend
        self.out_channels = int(w_bits.shape[0])
        self.out_hw = geo.out_hw
        oh, ow = self.out_hw
        with torch.no_grad():
            self.wq = weight_channel_words(w_bits, geo, backend)
            self.kp = self.wq.shape[1] * 32
            shift = self.kp - c * kh * kw
            corr = border_correction(w_bits, geo)
            if corr is not None:
                sub: Optional[Tensor] = (corr + shift).permute(1, 2, 0).reshape(oh * ow, -1)
            elif shift:
                sub = torch.tensor(shift, dtype=torch.int32, device=w_bits.device)
            else:
                sub = None
        self.sub = sub
        self._sub_by_dtype: dict[torch.dtype, Tensor] = {}
        self._gemm = _dispatch.implementation("xnor_matmul", backend)

    @property
    def nbytes(self) -> int:
        return self.wq.numel() * 4 + (0 if self.sub is None else self.sub.numel() * 4)

    def run(self, x: Tensor, scale: Optional[Tensor], bias: Optional[Tensor],
            channels_last_out: bool = False) -> Tensor:
        """``x`` ``(B, C, H, W)`` -> ``(B, O, OH, OW)`` in x's dtype: contiguous NCHW, or with
        ``channels_last_out`` the same values in channels_last memory (no final transpose copy)."""
        ct = ref.compute_dtype(x.dtype)
        (oh, ow), o, b = self.out_hw, self.out_channels, x.shape[0]
        a = channel_words(x, self.geo, self.backend)
        y = self._gemm(a, self.wq, self.kp).to(ct).view(b, oh * ow, o)
        if self.sub is not None:
            sub = self._sub_by_dtype.get(ct)
            if sub is None:
                sub = self._sub_by_dtype[ct] = self.sub.to(ct)
            y.sub_(sub)
        if scale is not None:
            y.mul_(scale.to(ct))
        if bias is not None:
            y.add_(bias.to(ct))
        y = y.view(b, oh, ow, o).permute(0, 3, 1, 2)
        if channels_last_out:
            return y.to(x.dtype)
        return y.to(x.dtype, memory_format=torch.contiguous_format)


# (weights' data_ptr, version, shape, strides, device, geometry without batch, backend) ->
# (weights, plan). The entry holds the weight tensor, so its memory cannot be freed and handed to
# another tensor while the key exists; in-place changes bump the version, so they miss.
# Shared by every thread: each lookup, insertion and eviction holds _PLANS_LOCK (an unguarded
# move_to_end/popitem raced with other threads' evictions: KeyError). Plans are built outside the
# lock (two threads may build the same plan; one of them is kept) and are read-only once built.
_PLANS: "OrderedDict[tuple, tuple[Tensor, ConvPlan]]" = OrderedDict()
_PLANS_MAX = 16
_PLANS_LOCK = threading.Lock()


def conv_plan(w_bits: Tensor, geo: ConvGeometry, backend: str) -> ConvPlan:
    """The :class:`ConvPlan` of these weights, geometry and backend, from a small LRU cache
    (inference tensors, which have no version counter, are not cached). Thread-safe."""
    if w_bits.is_inference():
        return ConvPlan(w_bits, geo, backend)
    key = (w_bits.data_ptr(), w_bits._version, tuple(w_bits.shape), tuple(w_bits.stride()),
           str(w_bits.device), replace(geo, batch=0), backend)
    with _PLANS_LOCK:
        hit = _PLANS.get(key)
        if hit is not None:
            _PLANS.move_to_end(key)
            return hit[1]
    plan = ConvPlan(w_bits, geo, backend)
    with _PLANS_LOCK:
        hit = _PLANS.get(key)
        if hit is not None:  # another thread built it meanwhile: keep one
            _PLANS.move_to_end(key)
            return hit[1]
        _PLANS[key] = (w_bits, plan)
        while len(_PLANS) > _PLANS_MAX:
            _PLANS.popitem(last=False)
    return plan


def conv_via_gemm(x: Tensor, w_bits: Tensor, geo: ConvGeometry, scale: Optional[Tensor],
                  bias: Optional[Tensor], backend: str) -> Tensor:
    """Binary conv on ``backend``'s pack and XNOR GEMM kernels (see :class:`ConvPlan`)."""
    return conv_plan(w_bits, geo, backend).run(x, scale, bias)
