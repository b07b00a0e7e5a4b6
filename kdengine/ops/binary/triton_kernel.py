"""Triton backend of the binary ops: bit packing, XNOR / AND popcount GEMM, fused binary linear.

Math. Rows are K sign bits in int32 words (bit j of word w = element 32w + j; 1 = -1 for signs,
1 = spike for spikes; padding bits 0, and masked off anyway). xnor: out = K - 2 popcount(a ^ b); spike:
out = popcount(s) - 2 popcount(s & w). Triton has no popcount that the interpreter runs, so it is
SWAR bit arithmetic on uint32 (pairs, nibbles, bytes, then two shift-adds: 12 integer ops/word).

Layout and traffic. A program owns a (BLOCK_M, BLOCK_N) tile of the int32 output and walks K in
BLOCK_W-word steps, loading a (BLOCK_M, BLOCK_W) A tile and a (BLOCK_N, BLOCK_W) B tile and
combining them in a broadcast (BLOCK_M, BLOCK_N, BLOCK_W) XOR/AND + popcount + reduction. Each
operand word is read M/BLOCK_M (B) or N/BLOCK_N (A) times. The fused linear kernel loads
(BLOCK_M, 32 BLOCK_W) floats of x instead of A words and packs them in registers (compare,
shift by the lane index, sum = OR of disjoint bits), so x is read once per N tile and never
written back as bits; its epilogue applies (K - 2 count) * scale + bias in fp32 (fp64 for fp64 x)
and stores x's dtype.

Output thresholding (:mod:`kdengine.ops.binary.threshold`): a program loads a (BLOCK_M, 32 BLOCK_W)
tile of int32 counts, the matching thresholds (table row r % P) and flips, and writes (BLOCK_M,
BLOCK_W) words: 4 B read per output, 1/8 B written. Max-pool on channel words
(:mod:`kdengine.ops.binary.pool`): a program owns (BLOCK_P output pixels, BLOCK_W words) and ANDs
(ORs for spikes) the kh*kw taps' words, padding taps masked to the identity.

Sizes: the interpreter (TRITON_INTERPRET=1, CPU tests) gets small tiles and wide K steps (few
loop iterations); on a GPU the tiles are 32 x 32 x 4 words (not tuned: no GPU was available when
this was written; `__popc` via inline asm would be faster but the interpreter cannot run it).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdengine._dispatch import triton_interpret

__all__ = ["pack_triton", "gemm_triton", "linear_triton", "threshold_triton", "maxpool_triton"]


@triton.jit
def _popc(x):
    """Population count of each uint32 lane (SWAR), as int32."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return (x & 0x3F).to(tl.int32)


@triton.jit
def _pack_kernel(x_ptr, out_ptr, K, W, SPIKES: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    j = tl.arange(0, 32)
    k = w[:, None] * 32 + j[None, :]
    m = k < K
    if SPIKES:
        v = tl.load(x_ptr + row * K + k, mask=m, other=0)
        bit = v != 0
    else:
        v = tl.load(x_ptr + row * K + k, mask=m, other=0.0)
        if UPCAST:  # fp16/bf16: compare in fp32 (exact; bf16 arithmetic is unreliable in the interpreter)
            v = v.to(tl.float32)
        bit = v < 0
    word = tl.sum(bit.to(tl.uint32) << j[None, :].to(tl.uint32), axis=1)  # disjoint bits: sum = OR
    tl.store(out_ptr + row * W + w, word.to(tl.int32, bitcast=True), mask=w < W)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, out_ptr, M, N, W, K, LAST, SPIKE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    pa = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        rw = w0 + tl.arange(0, BLOCK_W)
        mw = rw < W
        keep = tl.where(rw == W - 1, LAST, -1)[None, :]  # padding bits of the last word never count
        a = (tl.load(a_ptr + rm.to(tl.int64)[:, None] * W + rw[None, :],
                     mask=mm[:, None] & mw[None, :], other=0) & keep).to(tl.uint32, bitcast=True)
        b = (tl.load(b_ptr + rn.to(tl.int64)[:, None] * W + rw[None, :],
                     mask=mn[:, None] & mw[None, :], other=0) & keep).to(tl.uint32, bitcast=True)
        if SPIKE:
            x = a[:, None, :] & b[None, :, :]
            pa += tl.sum(_popc(a), axis=1)
        else:
            x = a[:, None, :] ^ b[None, :, :]
        acc += tl.sum(_popc(x), axis=2)
    if SPIKE:
        out = pa[:, None] - 2 * acc
    else:
        out = K - 2 * acc
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], out, mask=mm[:, None] & mn[None, :])


@triton.jit
def _linear_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, W, LAST,
                   HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                   F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_W: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < N
    j = tl.arange(0, 32).to(tl.uint32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        rk = w0 * 32 + tl.arange(0, BLOCK_W * 32)
        xv = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :],
                     mask=mm[:, None] & (rk < K)[None, :], other=0.0)
        if UPCAST:
            xv = xv.to(tl.float32)
        bits = tl.reshape((xv < 0).to(tl.uint32), (BLOCK_M, BLOCK_W, 32))
        a = tl.sum(bits << j[None, None, :], axis=2)  # (BLOCK_M, BLOCK_W) packed words
        rw = w0 + tl.arange(0, BLOCK_W)
        keep = tl.where(rw == W - 1, LAST, -1)[None, :]  # padding bits of the last word never count
        b = (tl.load(w_ptr + rn.to(tl.int64)[:, None] * W + rw[None, :],
                     mask=mn[:, None] & (rw < W)[None, :], other=0) & keep).to(tl.uint32, bitcast=True)
        acc += tl.sum(_popc(a[:, None, :] ^ b[None, :, :]), axis=2)
    dot = K - 2 * acc
    if F64:
        y = dot.to(tl.float64)
    else:
        y = dot.to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + rn, mask=mn, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=mn, other=0.0)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def _last_mask(k: int) -> int:
    """The valid bits of a row's last word as an int32 value (-1: all 32). Kernels AND the last
    word with it, so padding bits set after packing (PackedSigns.bits edited in place) never
    count."""
    rem = k % 32
    return (1 << rem) - 1 if rem else -1


def _p2(n: int, cap: int) -> int:
    return max(1, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _tiles(m: int, n: int, w: int) -> tuple[int, int, int]:
    if triton_interpret():  # few, wide loop iterations: the interpreter pays per iteration
        return _p2(m, 16), _p2(n, 16), _p2(w, 32)
    return 32, 32, _p2(w, 4)


def pack_triton(x: Tensor, spikes: bool) -> Tensor:
    """``x``: ``(R, K)`` contiguous (floating; bool with ``spikes``) -> int32 ``(R, ceil(K/32))``."""
    r, k = x.shape
    w = (k + 31) // 32
    out = torch.empty((r, w), dtype=torch.int32, device=x.device)
    if spikes:
        x = x.view(torch.uint8) if x.dtype == torch.bool else x
    bw = _p2(w, 64 if triton_interpret() else 4)
    _pack_kernel[(r, triton.cdiv(w, bw))](
        x, out, k, w, SPIKES=spikes, UPCAST=x.dtype in (torch.float16, torch.bfloat16), BLOCK_W=bw
    )
    return out


def gemm_triton(a: Tensor, b: Tensor, k: int, spike: bool) -> Tensor:
    """int32 ``(M, N)``: xnor (``spike=False``) or spike-AND (``spike=True``) popcount GEMM."""
    m, w = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    bm, bn, bw = _tiles(m, n, w)
    _gemm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        a, b, out, m, n, w, k, _last_mask(k), SPIKE=spike, BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw
    )
    return out


def linear_triton(x: Tensor, wbits: Tensor, k: int, scale: Optional[Tensor],
                  bias: Optional[Tensor]) -> Tensor:
    """Fused sign-pack + XNOR GEMM + ``* scale + bias``: ``(M, K)`` float -> ``(M, N)`` x's dtype."""
    m = x.shape[0]
    n, w = wbits.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm, bn, bw = _tiles(m, n, w)
    dummy = out  # never read when the flag is off
    _linear_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, wbits, scale if scale is not None else dummy, bias if bias is not None else dummy, out,
        m, n, k, w, _last_mask(k), HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        UPCAST=x.dtype in (torch.float16, torch.bfloat16), F64=x.dtype == torch.float64,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw,
    )
    return out


@triton.jit
def _threshold_kernel(c_ptr, t_ptr, f_ptr, out_ptr, M, N, P, NW, BLOCK_M: tl.constexpr,
                      BLOCK_W: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    j = tl.arange(0, 32)
    rn = rw[:, None] * 32 + j[None, :]  # (BLOCK_W, 32) channels
    mn = rn < N
    mm = rm < M
    m3 = mm[:, None, None] & mn[None, :, :]
    v = tl.load(c_ptr + rm.to(tl.int64)[:, None, None] * N + rn[None, :, :], mask=m3, other=0)
    t = tl.load(t_ptr + (rm % P).to(tl.int64)[:, None, None] * N + rn[None, :, :], mask=m3, other=0)
    f = tl.load(f_ptr + rn, mask=mn, other=0)
    v = tl.where(f[None, :, :] != 0, -v, v)
    bit = ((v <= t) & m3).to(tl.uint32)
    word = tl.sum(bit << j[None, None, :].to(tl.uint32), axis=2)  # disjoint bits: sum = OR
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * NW + rw[None, :], word.to(tl.int32, bitcast=True),
             mask=mm[:, None] & (rw < NW)[None, :])


def threshold_triton(counts: Tensor, table: Tensor, flip: Tensor) -> Tensor:
    """int32 ``(M, N)`` counts -> int32 ``(M, ceil(N/32))`` words; row r uses ``table[r % P]``."""
    m, n = counts.shape
    nw = (n + 31) // 32
    out = torch.empty((m, nw), dtype=torch.int32, device=counts.device)
    bm = _p2(m, 16 if triton_interpret() else 32)
    bw = _p2(nw, 8 if triton_interpret() else 2)
    _threshold_kernel[(triton.cdiv(m, bm), triton.cdiv(nw, bw))](
        counts, table, flip.to(torch.uint8), out, m, n, table.shape[0], nw, BLOCK_M=bm, BLOCK_W=bw
    )
    return out


@triton.jit
def _maxpool_kernel(x_ptr, out_ptr, H, W, OH, OW, CW, NPIX, LAST, SH, SW, PH, PW, DH, DW,
                    KH: tl.constexpr, KW: tl.constexpr, USE_OR: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr):
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixels (b, oh, ow)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mp = rp < NPIX
    mw = rw < CW
    b = rp // (OH * OW)
    q = rp % (OH * OW)
    oh = q // OW
    ow = q % OW
    if USE_OR:
        acc = tl.zeros((BLOCK_P, BLOCK_W), dtype=tl.int32)
    else:
        acc = tl.full((BLOCK_P, BLOCK_W), -1, dtype=tl.int32)
    for i in tl.static_range(KH):
        ih = oh * SH - PH + i * DH
        for j in tl.static_range(KW):
            iw = ow * SW - PW + j * DW
            inb = mp & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            src = ((b.to(tl.int64) * H + ih) * W + iw) * CW
            m2 = inb[:, None] & mw[None, :]
            if USE_OR:
                acc = acc | tl.load(x_ptr + src[:, None] + rw[None, :], mask=m2, other=0)
            else:
                acc = acc & tl.load(x_ptr + src[:, None] + rw[None, :], mask=m2, other=-1)
    acc = acc & tl.where(rw == CW - 1, LAST, -1)[None, :]  # channel padding bits stay 0
    tl.store(out_ptr + rp.to(tl.int64)[:, None] * CW + rw[None, :], acc, mask=mp[:, None] & mw[None, :])


def maxpool_triton(bits: Tensor, k: int, spikes: bool, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """Channel words ``(B, H, W, cw)`` -> max-pooled words ``(B, OH, OW, cw)`` (AND; OR for spikes)."""
    b, h, w, cw = bits.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = torch.empty((b, oh, ow, cw), dtype=torch.int32, device=bits.device)
    npix = b * oh * ow
    bp = _p2(npix, 64 if triton_interpret() else 32)
    bw = _p2(cw, 8)
    _maxpool_kernel[(triton.cdiv(npix, bp), triton.cdiv(cw, bw))](
        bits.contiguous(), out, h, w, oh, ow, cw, npix, _last_mask(k), sh, sw, ph, pw, dh, dw,
        KH=kh, KW=kw, USE_OR=spikes, BLOCK_P=bp, BLOCK_W=bw,
    )
    return out
