"""Binary ops: packed sign bits and XNOR / AND popcount matmuls, binary linear and conv2d.

Entry points (validate, pick a backend with :mod:`kdengine._dispatch`, run it):

* :func:`pack_signs` / :func:`pack_spikes` -> :class:`PackedSigns` (int32 words along K)
* :func:`xnor_matmul` (op ``"xnor_matmul"``): ``sum_k sign(a) sign(b) = K - 2 popcount(a ^ b)``
* :func:`spike_matmul` (op ``"spike_matmul"``): ``sum_k s sign(w) = popcount(s) - 2 popcount(s & w)``
* :func:`binary_linear` (op ``"binary_linear"``): ``(sign(x) @ sign(W)^T) * scale + bias``
* :func:`binary_conv2d` (op ``"binary_conv2d"``): ``conv2d(sign(x), sign(W)) * scale + bias``

Packing uses the op ``"binary_pack"``. Backends: ``reference`` (float64 matmul of unpacked +-1,
:mod:`kdengine.reference.binary`), ``cpu`` (C++ AVX2/POPCNT, ``csrc/cpu/xnor.cpp``), ``triton``
(``kernels/binary.py``) and ``cuda`` (``csrc/cuda/xnor.cu``).

Conventions. ``sign(x) = +1`` for ``x >= 0`` (so -0.0 is +1) and -1 for ``x < 0``; a NaN has no
sign and raises ValueError. Integer outputs are exact (int32, K < 2^31). Float outputs: the exact
integer dot product, converted to float32 (float64 for float64 inputs; exact while |dot| <= 2^24,
i.e. K <= 16,777,216 in float32), times ``scale``, plus ``bias``, rounded once to x's dtype.

Inference only: these ops define no gradient. They run under no-grad semantics whatever
``x.requires_grad`` is and return tensors that do not require grad (train with the
straight-through layers of :mod:`kdengine.nn`, then pack). So there is no first or second
derivative to get wrong: ``backward`` / ``torch.autograd.grad`` (``create_graph`` or not) through
them alone raises torch's "does not require grad" error, and under ``torch.func.grad`` (which
would silently return zeros) the float-input ops raise RuntimeError for a tracked input.

Zero padding in :func:`binary_conv2d`: a padded position contributes 0 to the sum, exactly like
``torch.conv2d`` on the +-1 tensor with zero padding. 0 is not a sign, so the kernels pack padded
taps as bit 0 (+1) and subtract, per output channel and position, the sum of ``sign(W)`` over the
taps that fall outside the image (a per-border correction computed from the per-channel tap sums
of the weights and the in-bounds masks of rows and columns; zero away from the borders). The
kernel backends pack ``sign(x)`` along channels per pixel (NHWC words, as Larq Compute Engine
does) and run im2col on words, 32x less data than on values; the weights are repacked per call
to the matching (kh, kw, C) word order.

Backend contract (``impl`` registered for each backend):

* ``"binary_pack"``: ``impl(x, spikes) -> int32 (R, W)``; ``x`` ``(R, K)`` contiguous; floating
  (bit = x < 0, NaN raises) or, with ``spikes=True``, bool (bit = x).
* ``"xnor_matmul"`` / ``"spike_matmul"``: ``impl(a_bits (M, W), b_bits (N, W), k) -> int32 (M, N)``.
* ``"binary_linear"``: ``impl(x (M, K), w_bits (N, W), k, scale, bias) -> (M, N)`` in x's dtype;
  ``scale``/``bias`` None or contiguous ``(N,)`` in the compute dtype.
* ``"binary_conv2d"``: ``impl(x (B, C, H, W), w_bits (O, W), geometry, scale, bias)``.
"""
from __future__ import annotations

import numbers
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine.reference import binary as ref

__all__ = [
    "PackedSigns",
    "pack_signs",
    "pack_spikes",
    "xnor_matmul",
    "spike_matmul",
    "binary_linear",
    "binary_conv2d",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The counts are int32 (K - 2 popcount): K must stay below 2^31, or xnor_matmul wraps around.
K_LIMIT = 2**31
IntPair = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- container


def _words(k: int) -> int:
    return (k + 31) // 32


def check_k_limit(k: int, what: str = "k") -> None:
    """Raise ValueError unless ``k < 2^31``: every count is an exact int32, and ``K - 2 * count``
    of a larger K would wrap around silently."""
    if k >= K_LIMIT:
        raise ValueError(
            f"{what}={k} is too large: the popcount kernels count in int32, so K must be "
            f"< 2^31 = {K_LIMIT}"
        )


@dataclass(frozen=True)
class PackedSigns:
    """K binary values per row, packed along the last dimension into int32 words.

    ``bits``: int32 ``(..., ceil(k / 32))``, contiguous; bit ``j`` of word ``w`` is element
    ``32 * w + j``; padding bits (elements ``>= k``) are 0. For signs bit 1 means -1 (``x < 0``)
    and bit 0 means +1; for spikes (``spikes=True``, made by :func:`pack_spikes`) bit 1 means 1.
    ``k``: the number of values per row (>= 1).

    Construction checks the dtype, ``k < 2^31`` (int32 counts), the shape and (one word per row,
    a cheap tensor op) that the padding bits are 0. ``bits`` is an ordinary tensor, so its padding
    bits can still be set in place afterwards: every backend ignores them (the reference unpacks
    only ``k`` values, the kernels mask the last word of each row), so such edits cannot change a
    result.
    """

    bits: Tensor
    k: int
    spikes: bool = False

    def __post_init__(self) -> None:
        bits, k = self.bits, self.k
        if not isinstance(bits, Tensor):
            raise TypeError(f"bits must be a torch.Tensor of int32 words, got {type(bits).__name__}")
        if bits.dtype != torch.int32:
            raise TypeError(f"bits must be int32 packed words, got dtype {bits.dtype}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k must be >= 1 (values per row), got {k}")
        check_k_limit(int(k), "k")  # before the shape check: a claimed huge k needs no huge bits
        if bits.dim() < 1 or bits.shape[-1] != _words(int(k)):
            raise ValueError(
                f"bits must have shape (..., ceil(k/32)) = (..., {_words(int(k))}) for k={k}, "
                f"got {tuple(bits.shape)}"
            )
        if not isinstance(self.spikes, bool):
            raise TypeError(f"spikes must be a bool, got {type(self.spikes).__name__}")
        object.__setattr__(self, "k", int(k))
        if not bits.is_contiguous():
            object.__setattr__(self, "bits", bits.contiguous())
        rem = int(k) % 32
        if rem and bits.numel() > 0:
            pad_mask = -(1 << rem)  # the bits above the last valid one, as an int32 value
            if bool((self.bits[..., -1] & pad_mask).ne(0).any()):
                raise ValueError(
                    f"bits has nonzero padding bits (bits {rem}..31 of the last word of some row, "
                    f"k={k}); padding bits must be 0"
                )

    @classmethod
    def _trusted(cls, bits: Tensor, k: int, spikes: bool = False) -> "PackedSigns":
        """Wrap words that a packer of this module just produced (no tensor checks, no sync; the
        K limit is checked: it is a plain int compare)."""
        check_k_limit(int(k), "k")
        obj = object.__new__(cls)
        object.__setattr__(obj, "bits", bits)
        object.__setattr__(obj, "k", int(k))
        object.__setattr__(obj, "spikes", spikes)
        return obj

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape ``(*leading, k)``."""
        return (*self.bits.shape[:-1], self.k)

    @property
    def device(self) -> torch.device:
        return self.bits.device

    @property
    def nbytes(self) -> int:
        return self.bits.numel() * 4

    def to(self, device: Union[str, torch.device]) -> "PackedSigns":
        """The same bits on ``device``."""
        return PackedSigns._trusted(self.bits.to(device), self.k, self.spikes)

    def unpack(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(..., k)`` values in ``dtype``: +-1 for signs, 0/1 for spikes."""
        return ref.unpack_reference(self.bits, self.k, spikes=self.spikes, dtype=dtype)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        kind = "spikes" if self.spikes else "signs"
        return f"PackedSigns(shape={self.shape}, {kind}, device={self.device})"


# --------------------------------------------------------------------------- validation helpers


def _check_packed(name: str, p: object, *, spikes: bool) -> PackedSigns:
    if not isinstance(p, PackedSigns):
        raise TypeError(
            f"{name} must be a PackedSigns (from pack_signs/pack_spikes), got {type(p).__name__}"
        )
    if p.spikes != spikes:
        what = "spikes (pack_spikes)" if spikes else "signs (pack_signs)"
        got = "spikes" if p.spikes else "signs"
        raise ValueError(f"{name} must hold packed {what}, got packed {got}")
    return p


def _check_float(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float64, float16 or bfloat16), got dtype {x.dtype}"
        )
    return x


def _check_no_func_grad(op: str, x: Tensor) -> None:
    """These ops define no gradient. Under plain autograd their outputs do not require grad (so a
    backward through them alone raises), but ``torch.func.grad`` would silently return zeros for
    the input it tracks (and the kernels cannot read its wrapped tensors): raise instead."""
    if torch._C._functorch.is_gradtrackingtensor(x):
        raise RuntimeError(
            f"{op} is inference-only and defines no gradient, so it cannot run inside torch.func "
            f"gradient transforms (grad, vjp, jacrev, ...), where it would silently give zero "
            f"gradients; train with the straight-through layers of kdengine.nn (sign_ste, "
            f"BinaryLinear, BinaryConv2d), and call {op} outside the transform"
        )


def _check_k(name: str, x: Tensor) -> int:
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., K), got a 0-dim tensor")
    k = x.shape[-1]
    if k == 0:
        raise ValueError(f"{name} is empty along K (shape {tuple(x.shape)}); expected K >= 1")
    check_k_limit(k, f"{name}'s K")
    return k


def _check_same_k(an: str, a: PackedSigns, bn: str, b: PackedSigns) -> None:
    if a.k != b.k:
        raise ValueError(f"K mismatch: {an} has K={a.k} but {bn} has K={b.k}")
    if a.device != b.device:
        raise ValueError(f"{an} is on {a.device} but {bn} on {b.device}; expected one device")


def _check_channel_vec(name: str, t: Optional[Tensor], n: int, like: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if tuple(t.shape) != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) (one value per output channel), got {tuple(t.shape)}"
        )
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x on {like.device}; expected one device")
    return t.detach().to(ref.compute_dtype(like.dtype)).contiguous()


def _pair(name: str, v: IntPair, minimum: int) -> tuple[int, int]:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        pair = (int(v), int(v))
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in v
    ):
        pair = (int(v[0]), int(v[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return pair


def _rows(p: PackedSigns, name: str) -> Tensor:
    if p.bits.dim() != 2:
        raise ValueError(f"{name} must be packed (N, K), got logical shape {p.shape}")
    return p.bits


# --------------------------------------------------------------------------- entry points


def _pack(x: Tensor, spikes: bool, backend: Optional[str]) -> PackedSigns:
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, k).contiguous()
    if x2.shape[0] == 0:
        bits = torch.zeros((0, _words(k)), dtype=torch.int32, device=x.device)
    else:
        name = _dispatch.resolve("binary_pack", x.device, backend)
        with torch.no_grad():
            bits = _dispatch.implementation("binary_pack", name)(x2, spikes)
    return PackedSigns._trusted(bits.reshape(*lead, _words(k)), k, spikes)


def pack_signs(x: Tensor, *, backend: Optional[str] = None) -> PackedSigns:
    """Sign bits of ``x`` packed along the last dimension.

    Args:
        x: ``(..., K)`` float32/float64/float16/bfloat16, K >= 1. ``x >= 0`` (also -0.0) is +1
            (bit 0), ``x < 0`` is -1 (bit 1). NaN raises ValueError.
        backend: packing backend (default: auto for x's device).

    Returns:
        :class:`PackedSigns` with ``bits`` int32 ``(..., ceil(K/32))`` and ``k = K``.
    """
    x = _check_float("x", x)
    _check_no_func_grad("pack_signs", x)
    _check_k("x", x)
    return _pack(x, False, backend)


def pack_spikes(s: Tensor, *, backend: Optional[str] = None) -> PackedSigns:
    """Spikes ``s`` (values 0 or 1; bool, integer or floating) packed along the last dimension.

    Bit 1 is a spike (1), bit 0 no spike; the result has ``spikes=True`` and feeds
    :func:`spike_matmul`. Any value other than 0 and 1 (NaN included) raises ValueError.
    """
    if not isinstance(s, Tensor):
        raise TypeError(f"s must be a torch.Tensor of 0/1 spikes, got {type(s).__name__}")
    if s.is_complex():
        raise TypeError(f"s must hold 0/1 spikes (bool, integer or floating), got dtype {s.dtype}")
    _check_no_func_grad("pack_spikes", s)
    _check_k("s", s)
    if s.dtype != torch.bool:
        bad = (s != 0) & (s != 1)
        if bool(bad.any()):
            first = s[bad].flatten()[0].item()
            raise ValueError(f"s must contain only 0 and 1 (spikes), found {first}")
        s = s != 0
    return _pack(s, True, backend)


def _matmul(op: str, a: PackedSigns, b: PackedSigns, an: str, bn: str, backend: Optional[str]) -> Tensor:
    _check_same_k(an, a, bn, b)
    b2 = _rows(b, bn)
    if a.bits.dim() < 2:
        raise ValueError(f"{an} must be packed (M, K) (or (..., K)), got logical shape {a.shape}")
    lead = a.bits.shape[:-1]
    a2 = a.bits.reshape(-1, a.bits.shape[-1])
    if a2.shape[0] == 0 or b2.shape[0] == 0:
        return torch.zeros((*lead, b2.shape[0]), dtype=torch.int32, device=a.device)
    name = _dispatch.resolve(op, a.device, backend)
    with torch.no_grad():
        out = _dispatch.implementation(op, name)(a2.contiguous(), b2.contiguous(), a.k)
    return out.reshape(*lead, b2.shape[0])


def xnor_matmul(a: PackedSigns, b: PackedSigns, *, backend: Optional[str] = None) -> Tensor:
    """``out[m, n] = sum_k sign(a[m, k]) sign(b[n, k]) = K - 2 popcount(a[m] XOR b[n])``, exact.

    Args:
        a: packed signs ``(M, K)`` (leading dims ``(..., K)`` allowed: the result is ``(..., N)``).
        b: packed signs ``(N, K)``, same K and device.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        int32 ``(M, N)``.
    """
    a = _check_packed("a", a, spikes=False)
    b = _check_packed("b", b, spikes=False)
    return _matmul("xnor_matmul", a, b, "a", "b", backend)


def spike_matmul(s: PackedSigns, w: PackedSigns, *, backend: Optional[str] = None) -> Tensor:
    """``out[m, n] = sum_k s[m, k] sign(w[n, k]) = popcount(s[m]) - 2 popcount(s[m] AND w[n])``.

    Args:
        s: packed spikes ``(M, K)`` from :func:`pack_spikes` (bit 1 = spike).
        w: packed signs ``(N, K)`` from :func:`pack_signs` (bit 1 = -1).

    Returns:
        int32 ``(M, N)``, exact.
    """
    s = _check_packed("s", s, spikes=True)
    w = _check_packed("w", w, spikes=False)
    return _matmul("spike_matmul", s, w, "s", "w", backend)


def binary_linear(
    x: Tensor,
    weight: PackedSigns,
    scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Binary linear layer: ``y = (sign(x) @ sign(W)^T) * scale[n] + bias[n]``.

    ``x`` is binarized and packed on the fly (inside the kernel on the cpu and triton backends).

    Args:
        x: ``(..., K)`` float32/float64/float16/bfloat16; NaN raises ValueError.
        weight: packed signs ``(N, K)`` (``pack_signs(W)`` of an ``(N, K)`` weight).
        scale: optional ``(N,)`` per-output-channel multiplier (e.g. mean |W|, XNOR-Net).
        bias: optional ``(N,)``.

    Returns:
        ``(..., N)`` in x's dtype, not requiring grad (inference op).
    """
    x = _check_float("x", x)
    _check_no_func_grad("binary_linear", x)
    k = _check_k("x", x)
    w = _check_packed("weight", weight, spikes=False)
    w2 = _rows(w, "weight")
    if w.k != k:
        raise ValueError(f"K mismatch: x has K={k} features but weight has K={w.k}")
    if w.device != x.device:
        raise ValueError(f"weight is on {w.device} but x on {x.device}; expected one device")
    n = w2.shape[0]
    sc = _check_channel_vec("scale", scale, n, x)
    bi = _check_channel_vec("bias", bias, n, x)
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, k).contiguous()
    if x2.shape[0] == 0 or n == 0:
        return torch.zeros((*lead, n), dtype=x.dtype, device=x.device)
    name = _dispatch.resolve("binary_linear", x.device, backend)
    with torch.no_grad():
        y = _dispatch.implementation("binary_linear", name)(x2, w2, k, sc, bi)
    return y.reshape(*lead, n)


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
    if w.device != x.device:
        raise ValueError(f"weight is on {w.device} but x on {x.device}; expected one device")
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
        # the same words in one C++ pass (csrc/cpu/conv_words.cpp)
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
    :func:`kdengine.reference.binary.epilogue`. The batch size may change between calls.
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


# --------------------------------------------------------------------------- backends


@_dispatch.register("binary_pack", "reference")
def _pack_reference(x: Tensor, spikes: bool) -> Tensor:
    return ref.pack_bool_reference(x) if spikes else ref.pack_signs_reference(x)


@_dispatch.register("xnor_matmul", "reference")
def _xnor_reference(a: Tensor, b: Tensor, k: int) -> Tensor:
    return ref.xnor_matmul_reference(a, b, k)


@_dispatch.register("spike_matmul", "reference")
def _spike_reference(s: Tensor, w: Tensor, k: int) -> Tensor:
    return ref.spike_matmul_reference(s, w, k)


@_dispatch.register("binary_linear", "reference")
def _linear_reference(x, w, k, scale, bias):
    return ref.binary_linear_reference(x, w, k, scale, bias)


@_dispatch.register("binary_conv2d", "reference")
def _conv_reference(x, w, geo: ConvGeometry, scale, bias):
    return ref.binary_conv2d_reference(
        x, w, geo.kernel, scale, bias, geo.stride, geo.padding, geo.dilation
    )


# cpu: the C++ ops of csrc/cpu/xnor.cpp (isa=-1: AVX2 where the CPU has it, else POPCNT/portable)


def _cpu_ops():
    from kdengine import _native

    return _native.ops("cpu")


def _native_has(name: str) -> bool:
    from kdengine import _native

    return _native.has_op("cpu", name)


@_dispatch.register("binary_pack", "cpu", native_ops=("binary_pack_signs", "binary_pack_bool"))
def _pack_cpu(x: Tensor, spikes: bool) -> Tensor:
    ops = _cpu_ops()
    return ops.binary_pack_bool(x, -1) if spikes else ops.binary_pack_signs(x, -1)


@_dispatch.register("xnor_matmul", "cpu", native_ops=("binary_gemm",))
def _xnor_cpu(a: Tensor, b: Tensor, k: int) -> Tensor:
    return _cpu_ops().binary_gemm(a, b, k, 0, -1)


@_dispatch.register("spike_matmul", "cpu", native_ops=("binary_gemm",))
def _spike_cpu(s: Tensor, w: Tensor, k: int) -> Tensor:
    return _cpu_ops().binary_gemm(s, w, k, 1, -1)


@_dispatch.register("binary_linear", "cpu", native_ops=("binary_linear",))
def _linear_cpu(x, w, k, scale, bias):
    return _cpu_ops().binary_linear(x, w, k, scale, bias, -1)


@_dispatch.register("binary_conv2d", "cpu", native_ops=("binary_gemm",))
def _conv_cpu(x, w, geo, scale, bias):
    return conv_via_gemm(x, w, geo, scale, bias, "cpu")


# triton: kernels/binary.py (SWAR popcount, runs in the interpreter too)


def _triton():
    from kdengine.kernels import binary as kb

    return kb


@_dispatch.register("binary_pack", "triton")
def _pack_triton(x: Tensor, spikes: bool) -> Tensor:
    if not spikes and bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be packed into +-1 bits")
    return _triton().pack_triton(x, spikes)


@_dispatch.register("xnor_matmul", "triton")
def _xnor_triton(a: Tensor, b: Tensor, k: int) -> Tensor:
    return _triton().gemm_triton(a, b, k, spike=False)


@_dispatch.register("spike_matmul", "triton")
def _spike_triton(s: Tensor, w: Tensor, k: int) -> Tensor:
    return _triton().gemm_triton(s, w, k, spike=True)


@_dispatch.register("binary_linear", "triton")
def _linear_triton(x, w, k, scale, bias):
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be binarized")
    return _triton().linear_triton(x, w, k, scale, bias)


@_dispatch.register("binary_conv2d", "triton")
def _conv_triton(x, w, geo, scale, bias):
    return conv_via_gemm(x, w, geo, scale, bias, "triton")


# cuda: csrc/cuda/xnor.cu (__popc)


def _cuda_ops():
    from kdengine import _native

    return _native.ops("cuda")


@_dispatch.register("binary_pack", "cuda", native_ops=("binary_pack_signs", "binary_pack_bool"))
def _pack_cuda(x: Tensor, spikes: bool) -> Tensor:
    if spikes:
        return _cuda_ops().binary_pack_bool(x)
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be packed into +-1 bits")
    return _cuda_ops().binary_pack_signs(x)


@_dispatch.register("xnor_matmul", "cuda", native_ops=("binary_gemm",))
def _xnor_cuda(a: Tensor, b: Tensor, k: int) -> Tensor:
    return _cuda_ops().binary_gemm(a, b, k, 0)


@_dispatch.register("spike_matmul", "cuda", native_ops=("binary_gemm",))
def _spike_cuda(s: Tensor, w: Tensor, k: int) -> Tensor:
    return _cuda_ops().binary_gemm(s, w, k, 1)


@_dispatch.register("binary_linear", "cuda", native_ops=("binary_linear",))
def _linear_cuda(x, w, k, scale, bias):
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be binarized")
    return _cuda_ops().binary_linear(x, w, k, scale, bias)


@_dispatch.register("binary_conv2d", "cuda", native_ops=("binary_gemm",))
def _conv_cuda(x, w, geo, scale, bias):
    return conv_via_gemm(x, w, geo, scale, bias, "cuda")
