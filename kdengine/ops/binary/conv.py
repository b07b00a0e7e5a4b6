"""Binary conv2d: the entry point, its geometry, and the conv pieces every kernel backend shares
(per-pixel channel words, the weights in (kh, kw, C) word order, the border correction of zero
padding, and the cached per-weight plan that runs the conv as pack + XNOR GEMM).

Beyond the plain conv (float in, float out), the same plan takes

* packed input: a :class:`PackedSigns` of channel words ``(B, H, W, C)`` (bits ``(B, H, W,
  ceil(C/32))``, the NHWC words a previous binary layer wrote), whose im2col runs on the words;
* packed output (``packed_output=True``): the counts thresholded per output channel straight to
  channel words (:mod:`kdengine.ops.binary.threshold`), no float tensor in between;
* groups: ``C/g`` input channels per group, packed per group (``ceil((C/g)/32)`` words per pixel
  and group; depthwise-like groups of 1..31 channels take one partly used word), and one GEMM
  per group, or the grouped popcount kernel where groups are small (op ``"xnor_grouped_matmul"``).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Optional, Union

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
from kdengine.ops.binary.threshold import SignThresholds, sign_thresholds, threshold_table


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one binary conv2d: input (B, C, H, W), kernel (kh, kw), output (OH, OW), and
    ``groups`` (C and O divisible by it)."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int = 1

    @property
    def per_group(self) -> "ConvGeometry":
        """One group's geometry: ``C/groups`` channels, the groups folded into the batch."""
        g = self.groups
        return replace(self, batch=self.batch * g, channels=self.channels // g, groups=1)

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        oh = (self.height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (self.width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return oh, ow


def _act_dtype(x: Union[Tensor, PackedSigns], scale: Optional[Tensor], bias: Optional[Tensor]) -> torch.dtype:
    """The float dtype a layer's output has: x's for a float x; for packed input float32, or
    float64 when scale or bias is float64."""
    if isinstance(x, Tensor):
        return x.dtype
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (scale, bias)) \
        else torch.float32


def check_conv_input(x: object) -> tuple[Union[Tensor, PackedSigns], tuple[int, int, int, int]]:
    """``x`` checked: a float ``(B, C, H, W)`` tensor or packed channel words (logical shape
    ``(B, H, W, C)``); returns it and ``(B, C, H, W)``."""
    if isinstance(x, PackedSigns):
        _check_packed("x", x, spikes=False)
        if x.bits.dim() != 4:
            raise ValueError(
                f"packed x must hold channel words of logical shape (B, H, W, C) (pack_channels), "
                f"got logical shape {x.shape}"
            )
        b, h, w, _ = x.bits.shape
        return x, (int(b), x.k, int(h), int(w))
    x = _check_float("x", x)
    _check_no_func_grad("binary_conv2d", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    return x, tuple(int(v) for v in x.shape)  # type: ignore[return-value]


def conv_geometry(shape: tuple[int, int, int, int], w_rows: int, w_k: int, kernel_size: IntPair,
                  stride: IntPair, padding: IntPair, dilation: IntPair, groups: int) -> ConvGeometry:
    """The checked :class:`ConvGeometry` of an input of ``shape`` (B, C, H, W) and packed weights
    of ``w_rows`` rows of ``w_k`` bits (names the argument at fault)."""
    kh, kw = _pair("kernel_size", kernel_size, 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    geo = ConvGeometry(
        *shape, kernel=(kh, kw), stride=_pair("stride", stride, 1),
        padding=_pair("padding", padding, 0), dilation=_pair("dilation", dilation, 1), groups=groups,
    )
    if min(shape[1:]) == 0:
        raise ValueError(f"x is empty (B, C, H, W = {shape}); expected C, H, W >= 1")
    if geo.channels % groups or w_rows % groups:
        raise ValueError(
            f"groups={groups} must divide the input channels (C={geo.channels}) and the output "
            f"channels (weight rows O={w_rows})"
        )
    cg = geo.channels // groups
    if w_k != cg * kh * kw:
        raise ValueError(
            f"K mismatch: weight has K={w_k} but x has C={geo.channels} channels in {groups} "
            f"group(s) and the kernel is {kh}x{kw}, so K must be (C/groups)*kh*kw={cg * kh * kw}"
        )
    oh, ow = geo.out_hw
    if oh < 1 or ow < 1:
        raise ValueError(
            f"the kernel (size {(kh, kw)}, dilation {geo.dilation}) does not fit the padded "
            f"input {shape[2:]} + padding {geo.padding}"
        )
    # the GEMM runs over kh*kw words of ceil(C/g/32) words each: its K (>= C/g*kh*kw) must fit too
    check_k_limit(kh * kw * 32 * _words(cg), "the conv GEMM's K = kh*kw*32*ceil(C/groups/32)")
    return geo


def binary_conv2d(
    x: Union[Tensor, PackedSigns],
    weight: PackedSigns,
    kernel_size: IntPair,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    packed_output: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, PackedSigns]:
    """Binary 2-D convolution: ``conv2d(sign(x), sign(W), groups) * scale[o] + bias[o]``.

    Zero padding is exact: a padded position contributes 0 (not +-1), as in ``torch.conv2d`` on
    the +-1 tensor; the kernels count padded taps as +1 and subtract a per-border correction
    (module docstring of :mod:`kdengine.ops.binary.op`).

    Args:
        x: ``(B, C, H, W)`` float32/float64/float16/bfloat16 (NaN raises ValueError), or a
            :class:`PackedSigns` of channel words with logical shape ``(B, H, W, C)``
            (:func:`kdengine.ops.binary.pack_channels`, or a binary layer's packed output).
        weight: ``pack_signs(W.flatten(1))`` of an ``(O, C/groups, kh, kw)`` weight: packed
            ``(O, C/groups*kh*kw)`` in (C, kh, kw) order.
        kernel_size: ``kh`` or ``(kh, kw)``.
        scale, bias: optional ``(O,)``.
        stride, padding, dilation: int or pair (padding >= 0, the others >= 1).
        groups: divides C and O; group ``i`` convolves input channels ``[i C/g, (i+1) C/g)``
            into output channels ``[i O/g, (i+1) O/g)``.
        packed_output: return the signs of the output as channel words instead of floats
            (``scale``/``bias`` must then be finite): bit 1 exactly where the float output is
            negative, computed from the integer counts by per-channel thresholds.

    Returns:
        ``(B, O, OH, OW)`` in x's dtype (float32 for packed x; float64 if scale or bias is), not
        requiring grad; or with ``packed_output`` a :class:`PackedSigns` of logical shape
        ``(B, OH, OW, O)``.
    """
    x, shape = check_conv_input(x)
    w = _check_packed("weight", weight, spikes=False)
    w2 = _rows(w, "weight")
    geo = conv_geometry(shape, w2.shape[0], w.k, kernel_size, stride, padding, dilation, groups)
    same_device("weight", w, "x", x)
    n = w2.shape[0]
    out_dtype = _act_dtype(x, scale, bias)
    like = x if isinstance(x, Tensor) else torch.empty(0, dtype=out_dtype, device=x.device)
    sc = _check_channel_vec("scale", scale, n, like)
    bi = _check_channel_vec("bias", bias, n, like)
    oh, ow = geo.out_hw
    if packed_output:
        th = sign_thresholds(sc, bi, w.k, channels=n, compute_dtype=ref.compute_dtype(out_dtype),
                             out_dtype=out_dtype, device=x.device)
        if geo.batch == 0:
            return PackedSigns._trusted(torch.zeros((0, oh, ow, _words(n)), dtype=torch.int32,
                                                    device=x.device), n)
        name = _dispatch.resolve("binary_conv2d_signs", x.device, backend)
        with torch.no_grad():
            bits = _dispatch.implementation("binary_conv2d_signs", name)(_detach(x), w2, geo, th)
        return PackedSigns._trusted(bits, n)
    if geo.batch == 0 or n == 0:
        return torch.zeros((geo.batch, n, oh, ow), dtype=out_dtype, device=x.device)
    name = _dispatch.resolve("binary_conv2d", x.device, backend)
    with torch.no_grad():
        return _dispatch.implementation("binary_conv2d", name)(_detach(x), w2, geo, sc, bi)


def _detach(x: Union[Tensor, PackedSigns]) -> Union[Tensor, PackedSigns]:
    return x.detach() if isinstance(x, Tensor) else x


# --------------------------------------------------------------------------- shared conv pieces


def channel_words(x: Tensor, geo: ConvGeometry, backend: str) -> Tensor:
    """Sign bits of ``x`` packed along channels per pixel (NHWC, LCE-style), spatially zero-padded
    with words of +1 bits, as im2col rows: int32 ``(B*OH*OW, kh*kw*ceil(C/32))`` in (kh, kw, C)
    order; channel padding bits are 0. Raises on NaN. (``groups`` is not looked at.)"""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    if backend == "cpu" and x.device.type == "cpu" and _native_has("binary_conv_words"):
        # the same words in one C++ pass (csrc/binary/conv_words.cpp)
        return _cpu_ops().binary_conv_words(x, kh, kw, sh, sw, ph, pw, dh, dw)
    return im2col_words(pixel_words(x, 1, backend), geo, backend)


def pixel_words(x: Tensor, groups: int, backend: str) -> Tensor:
    """Sign bits of ``x`` ``(B, C, H, W)`` packed per pixel and per group of ``C/groups``
    channels: int32 ``(B, H, W, groups*ceil(C/groups/32))``. Raises on NaN."""
    b, c, h, w = x.shape
    cg = c // groups
    # the float sign packer of every backend raises on NaN itself: no separate isnan pass
    rows = x.reshape(b, groups, cg, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w * groups, cg)
    words = _dispatch.implementation("binary_pack", backend)(rows.contiguous(), False)
    return words.reshape(b, h, w, groups * _words(cg))


def last_word_mask(k: int) -> int:
    """The valid bits of the last of ``ceil(k/32)`` words, as an int32 value (-1: all 32)."""
    rem = k % 32
    return (1 << rem) - 1 if rem else -1


def regroup_words(x: PackedSigns, groups: int, backend: str) -> Tensor:
    """Channel words ``(B, H, W, ceil(C/32))`` -> per-group words ``(B, H, W,
    groups*ceil(C/groups/32))`` with clean padding bits (set ones, edited in place after packing,
    would count as -1 in the im2col). Whole-word groups are slices of the channel words already."""
    c, bits = x.k, x.bits
    if c % 32:
        bits = bits.clone()
        bits[..., -1] &= last_word_mask(c)
    cg = c // groups
    if groups == 1 or cg % 32 == 0:
        return bits.contiguous()
    neg = ref.unpack_reference(bits, c, spikes=True, dtype=torch.uint8)  # 1 = -1
    b, h, w, _ = neg.shape
    words = _dispatch.implementation("binary_pack", backend)(neg.reshape(-1, cg).contiguous(), True)
    return words.reshape(b, h, w, groups * _words(cg))


def im2col_words(words: Tensor, geo: ConvGeometry, backend: str) -> Tensor:
    """im2col of per-pixel words ``(B', H, W, cw)``: int32 ``(B'*OH*OW, kh*kw*cw)`` in (kh, kw,
    word) order, the spatial zero padding as 0 words (+1 signs, corrected by the caller)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    if backend == "cpu" and words.device.type == "cpu" and _native_has("binary_im2col_words"):
        return _cpu_ops().binary_im2col_words(words, kh, kw, sh, sw, ph, pw, dh, dw)
    b, _, _, cw = words.shape
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
    the weights repacked to the (kh, kw, C) word order of :func:`channel_words` (per group), the
    GEMM's ``Kp = kh*kw*32*ceil(C/g/32)``, and the correction subtracted from the GEMM's counts --
    the padding border term (:func:`border_correction`) plus ``Kp - K`` (channel padding bits are 0
    in both operands, so XNOR counts them as agreements) -- laid out as ``(OH*OW, O)``.

    :meth:`run` does the rest per input: channel words, XNOR GEMM on ``backend``, and the epilogue
    in place in the GEMM's (pixels, O) layout. The integer counts and corrections are exact in the
    compute dtype (|values| < 2^24), then ``* scale`` and ``+ bias`` round separately, exactly as
    :func:`kdengine.ops.binary.reference.epilogue`. :meth:`run_signs` thresholds the raw counts
    into channel words instead (the correction folded into the thresholds, :meth:`signs_table`).
    ``x`` may be floats ``(B, C, H, W)`` or packed channel words; the batch size may change
    between calls.
    """

    def __init__(self, w_bits: Tensor, geo: ConvGeometry, backend: str) -> None:
        (kh, kw), g = geo.kernel, geo.groups
        self.geo, self.backend = geo, backend
        self.group_geo = geo.per_group
        self.k = self.group_geo.channels * kh * kw
        self.out_channels = int(w_bits.shape[0])
        self.out_hw = geo.out_hw
        oh, ow = self.out_hw
        with torch.no_grad():
            self.wq = weight_channel_words(w_bits, self.group_geo, backend)
            self.kp = self.wq.shape[1] * 32
            shift = self.kp - self.k
            corr = border_correction(w_bits, self.group_geo)
            if corr is not None:
                sub: Optional[Tensor] = (corr + shift).permute(1, 2, 0).reshape(oh * ow, -1).contiguous()
            elif shift:
                sub = torch.tensor(shift, dtype=torch.int32, device=w_bits.device)
            else:
                sub = None
        self.sub = sub
        self._sub_by_dtype: dict[torch.dtype, Tensor] = {}
        if g == 1:
            self._gemm = _dispatch.implementation("xnor_matmul", backend)
        else:
            grouped = _dispatch.implementation("xnor_grouped_matmul", backend)
            self._gemm = lambda a, b, k: grouped(a, b, k, g)

    @property
    def nbytes(self) -> int:
        return self.wq.numel() * 4 + (0 if self.sub is None else self.sub.numel() * 4)

    def words(self, x: Union[Tensor, PackedSigns]) -> Tensor:
        """The im2col rows of ``x``: int32 ``(groups*B*OH*OW, kh*kw*ceil(C/g/32))``, group-major."""
        g, backend = self.geo.groups, self.backend
        if isinstance(x, PackedSigns):
            pw = regroup_words(x, g, backend)
        elif g == 1:
            return channel_words(x, self.geo, backend)
        else:
            pw = pixel_words(x, g, backend)
        if g > 1:
            b, h, w, _ = pw.shape
            pw = pw.reshape(b, h, w, g, -1).permute(3, 0, 1, 2, 4).reshape(g * b, h, w, -1)
        return im2col_words(pw.contiguous(), self.geo, backend)

    def counts(self, x: Union[Tensor, PackedSigns]) -> Tensor:
        """Raw GEMM counts, int32 ``(B*OH*OW, O)`` (the correction not yet subtracted)."""
        return self._gemm(self.words(x), self.wq, self.kp)

    def run(self, x: Union[Tensor, PackedSigns], scale: Optional[Tensor], bias: Optional[Tensor],
            channels_last_out: bool = False, out_dtype: Optional[torch.dtype] = None) -> Tensor:
        """``x`` -> ``(B, O, OH, OW)`` in ``out_dtype`` (default: x's dtype; float32 for packed x):
        contiguous NCHW, or with ``channels_last_out`` the same values in channels_last memory
        (no final transpose copy)."""
        out_dtype = out_dtype or _act_dtype(x, scale, bias)
        ct = ref.compute_dtype(out_dtype)
        (oh, ow), o = self.out_hw, self.out_channels
        b = x.bits.shape[0] if isinstance(x, PackedSigns) else x.shape[0]
        y = self.counts(x).to(ct).view(b, oh * ow, o)
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
            return y.to(out_dtype)
        return y.to(out_dtype, memory_format=torch.contiguous_format)

    def signs_table(self, th: SignThresholds) -> tuple[Tensor, Tensor]:
        """``(table (P, O) int32, flip (O,))`` for :meth:`run_signs`: ``th`` (on exact counts)
        shifted by the correction, per output pixel where there is padding."""
        if th.channels != self.out_channels:
            raise ValueError(f"thresholds has {th.channels} channels, the conv has {self.out_channels}")
        return threshold_table(th, self.sub)

    def run_signs(self, x: Union[Tensor, PackedSigns], table: Tensor, flip: Tensor) -> Tensor:
        """``x`` -> int32 channel words ``(B, OH, OW, ceil(O/32))`` of the thresholded output."""
        (oh, ow), o = self.out_hw, self.out_channels
        b = x.bits.shape[0] if isinstance(x, PackedSigns) else x.shape[0]
        if self.geo.groups == 1:  # the GEMM and the threshold in one op (block by block on cpu)
            bits = _dispatch.implementation("xnor_signs", self.backend)(self.words(x), self.wq, self.kp,
                                                                      table, flip)
        else:
            bits = _dispatch.implementation("binary_threshold_pack", self.backend)(self.counts(x), table, flip)
        return bits.view(b, oh, ow, _words(o))


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


def conv_via_gemm(x: Union[Tensor, PackedSigns], w_bits: Tensor, geo: ConvGeometry,
                  scale: Optional[Tensor], bias: Optional[Tensor], backend: str) -> Tensor:
    """Binary conv on ``backend``'s pack and XNOR GEMM kernels (see :class:`ConvPlan`)."""
    return conv_plan(w_bits, geo, backend).run(x, scale, bias)


def conv_signs_via_gemm(x: Union[Tensor, PackedSigns], w_bits: Tensor, geo: ConvGeometry,
                        th: SignThresholds, backend: str) -> Tensor:
    """Binary conv with thresholded, packed output on ``backend``'s kernels (:class:`ConvPlan`)."""
    plan = conv_plan(w_bits, geo, backend)
    return plan.run_signs(x, *plan.signs_table(th))
