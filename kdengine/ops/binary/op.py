"""Binary ops: packed sign bits and XNOR / AND popcount matmuls, binary linear and conv2d.

Entry points (validate, pick a backend with :mod:`kdengine._dispatch`, run it):

* :func:`pack_signs` / :func:`pack_spikes` -> :class:`PackedSigns` (int32 words along K)
* :func:`xnor_matmul` (op ``"xnor_matmul"``): ``sum_k sign(a) sign(b) = K - 2 popcount(a ^ b)``
* :func:`spike_matmul` (op ``"spike_matmul"``): ``sum_k s sign(w) = popcount(s) - 2 popcount(s & w)``
* :func:`binary_linear` (op ``"binary_linear"``): ``(sign(x) @ sign(W)^T) * scale + bias``
* :func:`binary_conv2d` (op ``"binary_conv2d"``): ``conv2d(sign(x), sign(W)) * scale + bias``

Packing uses the op ``"binary_pack"``. Backends: ``reference`` (float64 matmul of unpacked +-1,
:mod:`kdengine.ops.binary.reference`), ``cpu`` (C++ AVX2/POPCNT, ``csrc/binary/``), ``triton``
(:mod:`kdengine.ops.binary.triton_kernel`) and ``cuda`` (``csrc/binary/xnor.cu``); binary conv2d
lives in :mod:`kdengine.ops.binary.conv`, the registrations in :mod:`kdengine.ops.binary.backends`.

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
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine._checks import flag, floating_tensor, same_device
from kdengine.ops.binary import reference as ref

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
        flag("spikes", self.spikes)
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
    return floating_tensor(name, x, FLOAT_DTYPES, listed=True)


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
    same_device(an, a, bn, b)


def _check_channel_vec(name: str, t: Optional[Tensor], n: int, like: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    t = floating_tensor(name, t, tensor_of=" or None")
    if tuple(t.shape) != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) (one value per output channel), got {tuple(t.shape)}"
        )
    same_device(name, t, "x", like)
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
    same_device("weight", w, "x", x)
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


# --------------------------------------------------------------------------- native library


def _cpu_ops():
    from kdengine import _native

    return _native.ops("cpu")


def _native_has(name: str) -> bool:
    from kdengine import _native

    return _native.has_op("cpu", name)
