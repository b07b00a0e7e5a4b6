"""Binary max-pool on packed channel words, and packing a float NCHW tensor into channel words.

Max-pooling commutes with the sign (``sign`` is non-decreasing, so ``sign(max z) = max sign(z)``),
so a max-pool between two binary layers can run on the bits. With the
:class:`~kdengine.ops.binary.PackedSigns` convention (bit 1 = -1) the max of +-1 values is +1 as
soon as one is +1: the pooled word is the bitwise AND of the window's words, 32 channels per
operation (Larq Compute Engine's bmaxpool does the same on its bitpacked tensors). For spikes
(bit 1 = 1) the max is the OR. Padding positions are skipped (torch pads max-pooling with -inf).

Entry point :func:`binary_max_pool2d` (op ``"binary_max_pool2d"``); backend contract:
``impl(bits (B, H, W, cw), k, spikes, kernel, stride, padding, dilation) -> int32 (B, OH, OW, cw)``
(channel padding bits 0).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine.ops.binary.op import IntPair, PackedSigns, _check_float, _check_packed, _pair

__all__ = ["binary_max_pool2d", "pack_channels", "unpack_channels", "pool_out_hw"]


def pack_channels(x: Tensor, *, backend: Optional[str] = None) -> PackedSigns:
    """Sign bits of ``x`` ``(B, C, H, W)`` packed along channels per pixel: a :class:`PackedSigns`
    of logical shape ``(B, H, W, C)`` (bits ``(B, H, W, ceil(C/32))``), the layout binary layers
    hand on to each other. NaN raises ValueError."""
    from kdengine.ops.binary.op import pack_signs

    x = _check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    return pack_signs(x.permute(0, 2, 3, 1), backend=backend)


def unpack_channels(x: PackedSigns, dtype: torch.dtype = torch.float32) -> Tensor:
    """Channel words (logical ``(B, H, W, C)``) -> ``(B, C, H, W)`` values (+-1, or 0/1 for
    spikes) in ``dtype``, channels-last in memory."""
    if not isinstance(x, PackedSigns) or x.bits.dim() != 4:
        raise ValueError("x must be a PackedSigns of channel words, logical shape (B, H, W, C)")
    return x.unpack(dtype).permute(0, 3, 1, 2)


def pool_out_hw(hw: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """``(OH, OW)`` of max_pool2d without ceil_mode."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                 for n, k, s, p, d in zip(hw, kernel, stride, padding, dilation))


def check_pool_geometry(kernel_size: IntPair, stride: Optional[IntPair], padding: IntPair,
                        dilation: IntPair) -> tuple[tuple[int, int], ...]:
    """``(kernel, stride, padding, dilation)`` as pairs, checked as torch's max_pool2d does
    (stride defaults to the kernel size; padding at most half the kernel)."""
    k = _pair("kernel_size", kernel_size, 1)
    s = k if stride is None else _pair("stride", stride, 1)
    p = _pair("padding", padding, 0)
    d = _pair("dilation", dilation, 1)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"padding must be at most half the kernel size {k}, got {p}")
    return k, s, p, d


def binary_max_pool2d(
    x: PackedSigns,
    kernel_size: IntPair,
    stride: Optional[IntPair] = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    backend: Optional[str] = None,
) -> PackedSigns:
    """Max-pool of packed channel words: ``pack(max_pool2d(unpack(x)))`` without unpacking.

    Args:
        x: :class:`PackedSigns` of channel words, logical shape ``(B, H, W, C)`` (bits ``(B, H,
            W, ceil(C/32))``; :func:`pack_channels` or a binary layer's packed output); signs
            (AND of words) or spikes (OR).
        kernel_size, stride (default: kernel_size), padding (<= kernel/2), dilation: as in
            ``torch.nn.functional.max_pool2d`` (no ceil_mode).

    Returns:
        :class:`PackedSigns` ``(B, OH, OW, C)``, same kind (signs/spikes) as ``x``.
    """
    if not isinstance(x, PackedSigns):
        raise TypeError(f"x must be a PackedSigns of channel words (pack_channels), got {type(x).__name__}")
    x = _check_packed("x", x, spikes=x.spikes)
    if x.bits.dim() != 4:
        raise ValueError(f"x must hold channel words of logical shape (B, H, W, C), got {x.shape}")
    k, s, p, d = check_pool_geometry(kernel_size, stride, padding, dilation)
    b, h, w, cw = x.bits.shape
    if h == 0 or w == 0:
        raise ValueError(f"x is empty (logical shape {x.shape}); expected H, W >= 1")
    oh, ow = pool_out_hw((h, w), k, s, p, d)
    if oh < 1 or ow < 1:
        raise ValueError(f"the window (size {k}, dilation {d}) does not fit the input {(h, w)} + padding {p}")
    if b == 0:
        return PackedSigns._trusted(torch.zeros((0, oh, ow, cw), dtype=torch.int32, device=x.device), x.k, x.spikes)
    name = _dispatch.resolve("binary_max_pool2d", x.device, backend)
    with torch.no_grad():
        bits = _dispatch.implementation("binary_max_pool2d", name)(x.bits, x.k, x.spikes, k, s, p, d)
    return PackedSigns._trusted(bits, x.k, x.spikes)
