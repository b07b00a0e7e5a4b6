"""Output thresholding: a binary layer followed by a sign, from int32 counts straight to packed bits.

When the next layer is binary it only reads the sign of this layer's output, so the float tensor
``y = f(count)`` (``f``: ``* scale + bias``, maybe a folded batch norm) is never needed: for each
output channel ``f`` is monotone in the integer count, so ``y < 0`` (bit 1 = -1, the
:class:`~kdengine.ops.binary.PackedSigns` convention) is one integer compare,

    bit = (flip[n] ? -v : v) <= t[n]        (v: the exact count, border correction included)

as Larq Compute Engine's bconv2d with bitpacked output does with its output thresholds. The
thresholds are found by bisection on the very float operations the float path runs (``f`` is
evaluated on candidate counts in the compute dtype, two roundings, then rounded to the output
dtype), so the bit equals ``pack_signs(float path)`` for every count, ties and zero or negative
scales included, not merely up to rounding. A negative scale makes ``f`` decreasing
(``flip = True``); a zero scale makes it constant (every count gives the sign of the bias).

Entry points: :func:`sign_thresholds` (scale, bias -> :class:`SignThresholds`), :func:`threshold_pack`
(op ``"binary_threshold_pack"``: int32 counts -> packed signs) and :func:`xnor_matmul_signs` (op
``"xnor_signs"``: the XNOR GEMM thresholded without its count matrix; on the cpu backend block by
block in C++, ``csrc/binary/threshold.cpp``). Binary conv2d with ``packed_output=True`` is in
:mod:`kdengine.ops.binary.conv`.

Backend contract:

* ``"binary_threshold_pack"``: ``impl(counts int32 (M, N), table int32 (P, N), flip bool (N,))
  -> int32 (M, ceil(N/32))``; output row ``r`` uses table row ``r % P``.
* ``"xnor_signs"``: ``impl(a (M, W), b (N, W), k, table, flip)``: the same on
  ``xnor_matmul(a, b)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine._checks import floating_tensor, same_device
from kdengine.ops.binary import reference as ref
from kdengine.ops.binary.op import (
    PackedSigns,
    _check_packed,
    _rows,
    _words,
    check_k_limit,
)

__all__ = ["SignThresholds", "sign_thresholds", "threshold_pack", "xnor_matmul_signs",
           "threshold_table"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class SignThresholds:
    """Per output channel: ``bit = (flip ? -v : v) <= t`` for an exact count ``v`` in ``[-k, k]``.

    ``t``: int64 ``(N,)``; ``flip``: bool ``(N,)``; ``k``: the largest ``|v|`` the thresholds were
    derived for (counts outside ``[-k, k]`` cannot occur)."""

    t: Tensor
    flip: Tensor
    k: int

    @property
    def channels(self) -> int:
        return int(self.t.shape[0])

    def bits_of(self, v: Tensor) -> Tensor:
        """Bool bits (True = -1) of counts ``v`` ``(..., N)`` (int64-safe; the reference)."""
        v = v.to(torch.int64)
        return torch.where(self.flip, -v, v) <= self.t


Epilogue = Callable[[Tensor], Tensor]


def affine_epilogue(scale: Optional[Tensor], bias: Optional[Tensor], compute: torch.dtype,
                    out_dtype: torch.dtype) -> Epilogue:
    """``v -> (v.to(compute) * scale + bias).to(out_dtype)`` on ``(L, N)`` counts: the float
    path's epilogue (:func:`kdengine.ops.binary.reference.epilogue`), two roundings."""
    sc = None if scale is None else scale.detach().to(compute)
    bi = None if bias is None else bias.detach().to(compute)

    def f(v: Tensor) -> Tensor:
        y = v.to(compute)
        if sc is not None:
            y = y * sc
        if bi is not None:
            y = y + bi
        return y.to(out_dtype)

    return f


def sign_thresholds(
    scale: Optional[Tensor],
    bias: Optional[Tensor],
    k: int,
    *,
    channels: Optional[int] = None,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: Optional[torch.dtype] = None,
    post: Optional[Epilogue] = None,
    device: Optional[torch.device] = None,
) -> SignThresholds:
    """The integer thresholds of ``sign(post((v * scale + bias).to(out_dtype)))`` per channel.

    Args:
        scale, bias: ``(N,)`` floating or None (1 / 0); finite (a NaN or infinite scale or bias
            has no sign to threshold: ValueError).
        k: counts lie in ``[-k, k]`` (``k`` = the layer's K, ``1 <= k < 2^31``).
        channels: N when both ``scale`` and ``bias`` are None.
        compute_dtype: dtype of the ``* scale + bias`` step (float32, or float64).
        out_dtype: dtype the float path rounds to before the sign (default ``compute_dtype``).
        post: further per-channel monotone float ops on ``(L, N)`` values (a folded batch norm,
            a hardtanh...), evaluated as they are; increasing or decreasing per channel.
        device: where the thresholds live (default: scale's / bias's device, else CPU).

    Returns:
        :class:`SignThresholds` with ``bits == (float path < 0)`` for every integer count in
        ``[-k, k]``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (the counts' bound), got {k!r}")
    check_k_limit(k, "k")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    n = channels
    for name, t in (("scale", scale), ("bias", bias)):
        if t is None:
            continue
        t = floating_tensor(name, t, tensor_of=" or None")
        if t.dim() != 1 or (n is not None and t.shape[0] != n):
            raise ValueError(f"{name} must have shape ({n if n is not None else 'N'},), got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite: a NaN or infinite {name} gives outputs with no sign")
        n = t.shape[0]
        device = device or t.device
    if n is None or n < 1:
        raise ValueError("channels must be given (>= 1) when scale and bias are both None")
    if scale is not None and bias is not None:
        same_device("scale", scale, "bias", bias)
    device = device or torch.device("cpu")
    f = affine_epilogue(scale, bias, compute_dtype, out_dtype or compute_dtype)

    def neg(v: Tensor) -> Tensor:  # v: int64 (N,) -> bool (N,): is the float path's value < 0
        y = f(v[None, :])
        if post is not None:
            y = post(y)
        y = y.reshape(-1)
        if bool(torch.isnan(y).any()):
            raise ValueError("the epilogue gives NaN for some count: the output has no sign")
        return y < 0

    lo = torch.full((n,), -k, dtype=torch.int64, device=device)
    hi = torch.full((n,), k, dtype=torch.int64, device=device)
    at_lo, at_hi = neg(lo), neg(hi)
    inc = ~at_lo & at_hi  # negative only for large counts: a decreasing sign test (flip)
    const = at_lo == at_hi
    # b(v) = neg(v) != inc is True at -k and False at +k on the non-constant channels: bisect for
    # the largest v with b(v) True.
    while True:
        open_ = (~const) & (hi - lo > 1)
        if not bool(open_.any()):
            break
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        b = neg(mid) != inc
        lo = torch.where(open_ & b, mid, lo)
        hi = torch.where(open_ & ~b, mid, hi)
    # non-flip: bit = v <= lo; flip: neg for v >= lo + 1, bit = -v <= -(lo + 1)
    t = torch.where(inc, -(lo + 1), lo)
    # constant sign: every count (v <= k) or none (v <= -k - 1); still exact after a shift by sub
    t = torch.where(const, torch.where(at_lo, torch.full_like(t, k), torch.full_like(t, -k - 1)), t)
    return SignThresholds(t, inc & ~const, int(k))


def threshold_table(th: SignThresholds, sub: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(table int32 (P, N), flip bool (N,))`` comparing raw counts ``c`` where the exact count
    is ``v = c - sub`` (``sub``: None, a scalar or ``(P, N)`` int, e.g. a conv's border
    correction per output pixel): ``(flip ? -c : c) <= t +- sub``, clamped to int32 (counts are
    int32, so a clamped threshold compares the same)."""
    t = th.t.to(torch.int64)[None, :]
    if sub is not None:
        s = sub.to(device=t.device, dtype=torch.int64)
        s = s.reshape(1, 1) if s.dim() == 0 else s
        t = t + torch.where(th.flip[None, :], -s, s)
    return t.clamp(INT32_MIN, INT32_MAX).to(torch.int32).contiguous(), th.flip.contiguous()


def threshold_pack(counts: Tensor, thresholds: SignThresholds, *, backend: Optional[str] = None) -> PackedSigns:
    """Packed sign bits of per-channel thresholded counts: ``bit[.., n] = (flip ? -v : v) <= t[n]``.

    Args:
        counts: int32 ``(..., N)`` exact counts (e.g. :func:`kdengine.ops.xnor_matmul`'s).
        thresholds: :class:`SignThresholds` of N channels (:func:`sign_thresholds`).
        backend: ``"reference"``, ``"cpu"``, ``"triton"`` or auto.

    Returns:
        :class:`PackedSigns` ``(..., N)``: bit 1 (-1) where the float path is negative.
    """
    if not isinstance(counts, Tensor) or counts.dtype != torch.int32:
        raise TypeError(f"counts must be an int32 torch.Tensor, got {getattr(counts, 'dtype', type(counts).__name__)}")
    if not isinstance(thresholds, SignThresholds):
        raise TypeError(f"thresholds must be a SignThresholds (sign_thresholds), got {type(thresholds).__name__}")
    n = thresholds.channels
    if counts.dim() < 1 or counts.shape[-1] != n:
        raise ValueError(f"counts must have shape (..., {n}) (one count per channel), got {tuple(counts.shape)}")
    same_device("counts", counts, "thresholds", thresholds.t)
    lead = counts.shape[:-1]
    c2 = counts.reshape(-1, n).contiguous()
    if c2.shape[0] == 0:
        return PackedSigns._trusted(torch.zeros((*lead, _words(n)), dtype=torch.int32, device=counts.device), n)
    table, flip = threshold_table(thresholds)
    name = _dispatch.resolve("binary_threshold_pack", counts.device, backend)
    with torch.no_grad():
        bits = _dispatch.implementation("binary_threshold_pack", name)(c2, table, flip)
    return PackedSigns._trusted(bits.reshape(*lead, _words(n)), n)


def xnor_matmul_signs(a: PackedSigns, b: PackedSigns, scale: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> PackedSigns:
    """Signs of ``xnor_matmul(a, b) * scale + bias`` (float32 epilogue; float64 if scale or bias
    is float64), packed: a binary linear layer whose output feeds another binary layer.

    Args:
        a: packed signs ``(M, K)`` (or ``(..., K)``); b: packed signs ``(N, K)``, same K.
        scale, bias: optional ``(N,)``, finite.

    Returns:
        :class:`PackedSigns` ``(..., N)`` equal to ``pack_signs(xnor_matmul(a, b) * scale + bias)``.
    """
    a = _check_packed("a", a, spikes=False)
    b = _check_packed("b", b, spikes=False)
    if a.k != b.k:
        raise ValueError(f"K mismatch: a has K={a.k} but b has K={b.k}")
    same_device("a", a, "b", b)
    b2 = _rows(b, "b")
    if a.bits.dim() < 2:
        raise ValueError(f"a must be packed (M, K) (or (..., K)), got logical shape {a.shape}")
    n = b2.shape[0]
    if n == 0:
        raise ValueError("b must have N >= 1 rows")
    ct = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (scale, bias)) else torch.float32
    th = sign_thresholds(scale, bias, a.k, channels=n, compute_dtype=ct, device=a.device)
    lead = a.bits.shape[:-1]
    a2 = a.bits.reshape(-1, a.bits.shape[-1]).contiguous()
    if a2.shape[0] == 0:
        return PackedSigns._trusted(torch.zeros((*lead, _words(n)), dtype=torch.int32, device=a.device), n)
    table, flip = threshold_table(th)
    name = _dispatch.resolve("xnor_signs", a.device, backend)
    with torch.no_grad():
        bits = _dispatch.implementation("xnor_signs", name)(a2, b2.contiguous(), a.k, table, flip)
    return PackedSigns._trusted(bits.reshape(*lead, _words(n)), n)


# --------------------------------------------------------------------------- reference


def threshold_pack_reference(counts: Tensor, table: Tensor, flip: Tensor) -> Tensor:
    """int32 ``(M, N)`` counts -> int32 ``(M, ceil(N/32))`` words (row r uses ``table[r % P]``)."""
    m = counts.shape[0]
    p = table.shape[0]
    rows = table.to(torch.int64)[torch.arange(m, device=counts.device) % p]
    v = counts.to(torch.int64)
    return ref.pack_bool_reference(torch.where(flip, -v, v) <= rows)
