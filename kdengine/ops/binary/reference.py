"""Reference semantics of the binary (XNOR / AND popcount) ops: plain torch, float64, obviously right.

Bit layout (the one of :class:`kdengine.ops.binary.PackedSigns`): a row of K values becomes
``ceil(K / 32)`` int32 words; bit ``j`` of word ``w`` is element ``32 * w + j``; padding bits 0.
Signs: bit 1 means -1 (``x < 0``), bit 0 means +1 (``x >= 0``, so -0.0 is +1). Spikes: bit 1 means
a spike (1), bit 0 means 0.

The matmuls here unpack to +-1 / 0-1 float64 and use an ordinary matmul, which is exact for
``K < 2**53``; every kernel backend must equal these results bit for bit (integer outputs) or up
to the rounding of the final ``* scale + bias`` (float outputs: exactly, where the backend does
that step as one multiply and one add, like torch).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "pack_bool_reference",
    "pack_signs_reference",
    "unpack_reference",
    "xnor_matmul_reference",
    "spike_matmul_reference",
    "binary_linear_reference",
    "binary_conv2d_reference",
    "binary_max_pool2d_reference",
    "xnor_grouped_matmul_reference",
    "epilogue",
]


def pack_bool_reference(b: Tensor) -> Tensor:
    """``b``: ``(..., K)`` bool -> ``(..., ceil(K/32))`` int32 words, bit = ``b``."""
    k = b.shape[-1]
    words = (k + 31) // 32
    u = b.to(torch.int64)
    if words * 32 != k:
        u = F.pad(u, (0, words * 32 - k))
    shifts = torch.arange(32, device=b.device, dtype=torch.int64)
    v = (u.reshape(*b.shape[:-1], words, 32) << shifts).sum(-1)  # in [0, 2^32)
    v = torch.where(v >= 2**31, v - 2**32, v)  # two's complement int32
    return v.to(torch.int32)


def pack_signs_reference(x: Tensor) -> Tensor:
    """``x``: ``(..., K)`` floating -> int32 words with bit = ``x < 0``. Raises on NaN."""
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be packed into +-1 bits")
    return pack_bool_reference(x < 0)


def unpack_reference(bits: Tensor, k: int, spikes: bool = False, dtype=torch.float64) -> Tensor:
    """int32 words ``(..., W)`` -> ``(..., k)``: +-1 (signs) or 0/1 (spikes) in ``dtype``."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    b = (bits.unsqueeze(-1) >> shifts) & 1  # arithmetic shift; & 1 keeps the right bit
    b = b.reshape(*bits.shape[:-1], bits.shape[-1] * 32)[..., :k]
    if spikes:
        return b.to(dtype)
    return (1 - 2 * b).to(dtype)


def xnor_matmul_reference(a_bits: Tensor, b_bits: Tensor, k: int) -> Tensor:
    """``(M, W)``, ``(N, W)`` packed signs -> int32 ``(M, N)`` = sum_k sign(a) sign(b)."""
    a = unpack_reference(a_bits, k)
    b = unpack_reference(b_bits, k)
    return torch.round(a @ b.T).to(torch.int32)


def spike_matmul_reference(s_bits: Tensor, w_bits: Tensor, k: int) -> Tensor:
    """``(M, W)`` packed spikes, ``(N, W)`` packed signs -> int32 ``(M, N)`` = sum_k s sign(w)."""
    s = unpack_reference(s_bits, k, spikes=True)
    w = unpack_reference(w_bits, k)
    return torch.round(s @ w.T).to(torch.int32)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the ``* scale + bias`` step: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def epilogue(dot: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], out_dtype: torch.dtype,
             channel_dim: int = -1) -> Tensor:
    """``(dot * scale + bias)`` in the compute dtype of ``out_dtype``, rounded once to it.

    ``dot``: exact integer dot products (any dtype); ``scale``/``bias``: ``(N,)`` along
    ``channel_dim``. The multiply and the add are separate roundings (no FMA)."""
    ct = compute_dtype(out_dtype)
    y = dot.to(ct)
    shape = [1] * dot.dim()
    shape[channel_dim] = -1
    if scale is not None:
        y = y * scale.to(ct).reshape(shape)
    if bias is not None:
        y = y + bias.to(ct).reshape(shape)
    return y.to(out_dtype)


def binary_linear_reference(x: Tensor, w_bits: Tensor, k: int, scale: Optional[Tensor] = None,
                            bias: Optional[Tensor] = None) -> Tensor:
    """``x``: ``(M, K)`` floating; ``w_bits``: ``(N, W)`` -> ``(M, N)`` in x's dtype:
    ``(sign(x) @ sign(W)^T) * scale + bias`` with ``sign(x) = +1`` for ``x >= 0``."""
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be binarized")
    sx = torch.where(x < 0, -1.0, 1.0).to(torch.float64)
    w = unpack_reference(w_bits, k)
    return epilogue(torch.round(sx @ w.T), scale, bias, x.dtype)


def binary_conv2d_dot(x: Tensor, w_bits: Tensor, kernel_size: tuple[int, int],
                      stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                      groups: int = 1) -> Tensor:
    """``torch.conv2d(sign(x), sign(W), groups=groups)`` in float64 (exact integers) with true zero
    padding (a padded position contributes 0, not +-1): ``(B, O, OH, OW)``."""
    if bool(torch.isnan(x).any()):
        raise ValueError("x contains NaN; a NaN has no sign, so it cannot be binarized")
    cg = x.shape[1] // groups
    kh, kw = kernel_size
    sx = torch.where(x < 0, -1.0, 1.0).to(torch.float64)
    w = unpack_reference(w_bits, cg * kh * kw).reshape(w_bits.shape[0], cg, kh, kw)
    return torch.round(F.conv2d(sx, w, stride=stride, padding=padding, dilation=dilation, groups=groups))


def binary_conv2d_reference(x: Tensor, w_bits: Tensor, kernel_size: tuple[int, int],
                            scale: Optional[Tensor], bias: Optional[Tensor],
                            stride: tuple[int, int], padding: tuple[int, int],
                            dilation: tuple[int, int], groups: int = 1,
                            out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """:func:`binary_conv2d_dot`, then ``* scale + bias`` per output channel; ``out_dtype``
    (default x's dtype) out."""
    dot = binary_conv2d_dot(x, w_bits, kernel_size, stride, padding, dilation, groups)
    return epilogue(dot, scale, bias, out_dtype or x.dtype, channel_dim=1)


def xnor_grouped_matmul_reference(a_bits: Tensor, b_bits: Tensor, k: int, groups: int) -> Tensor:
    """``(g*M, W)``, ``(g*Ng, W)`` -> int32 ``(M, g*Ng)``: group i's rows of a times its rows of b."""
    a = a_bits.reshape(groups, -1, a_bits.shape[-1])
    b = b_bits.reshape(groups, -1, b_bits.shape[-1])
    return torch.cat([xnor_matmul_reference(a[i], b[i], k) for i in range(groups)], dim=1)


def binary_max_pool2d_reference(bits: Tensor, k: int, spikes: bool, kernel_size: tuple[int, int],
                                stride: tuple[int, int], padding: tuple[int, int],
                                dilation: tuple[int, int]) -> Tensor:
    """Channel words ``(B, H, W, ceil(k/32))`` -> the words of ``max_pool2d`` of the unpacked
    +-1 (or 0/1) values in float64 (padding is -inf, as in torch): ``(B, OH, OW, ceil(k/32))``."""
    v = unpack_reference(bits, k, spikes=spikes).permute(0, 3, 1, 2)
    y = F.max_pool2d(v, kernel_size, stride, padding, dilation).permute(0, 2, 3, 1)
    return pack_bool_reference(y > 0.5) if spikes else pack_bool_reference(y < 0)
