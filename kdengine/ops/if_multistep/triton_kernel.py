"""Triton multi-step integrate-and-fire kernels: forward over all T steps, fused backward through time.

Math (per neuron; state in fp32, or fp64 for float64 input; see kdengine/ops/if_multistep/reference.py):

    h_t = v_{t-1} + x_t;  s_t = [h_t >= theta] (NaN if h_t is NaN)
    v_t = s_t ? h_t - theta : h_t   (soft reset)   |   s_t ? v_reset : h_t   (hard reset)
    backward, c = dL/dv_t carried from t = T-1 down to 0 (starting at dL/dv_final or 0):
    g_t = gs_t sg(h_t - theta) + c dv_t/dh_t;  dL/dx_t = g_t;  c <- g_t;  dL/dv_init = c

Layout: x, spikes, h, grad_spikes, grad_x are contiguous ``(T, N)``. One program owns BLOCK
neurons and loops over T with their potentials in registers, so each step is one coalesced load
of BLOCK inputs and one store of BLOCK spikes.

Memory traffic (fp32, per element per step): forward 8 B (read x, write s), plus 4 B to store h
when a backward will follow; backward 12 B (read h and gs, write gx). The backward needs h_t in
reverse order, which a GPU thread cannot keep for arbitrary T in registers; recomputing it from x
would need a scratch buffer of the same size (or a checkpointed second pass), so on GPUs the
forward stores h (fp32) when autograd needs it: 24 B per element-step for forward + backward.
(The CPU backend recomputes h instead: 20 B, its per-core buffer lives in L2.)

Scalars (theta, v_reset, the resting potential, alpha, pi/2 alpha, alpha/2) arrive in a small
tensor of the state dtype: a Python float argument would be passed to Triton as fp32, which for
float64 input would move the threshold (fp32(0.7) != 0.7) and change spikes.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _neurons(N, BLOCK: tl.constexpr):
    """This program's BLOCK neurons: their int64 offsets (pid * BLOCK cannot overflow int32) and
    the mask of those below N."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def _if_fwd_kernel(x_ptr, v0_ptr, s_ptr, v_ptr, h_ptr, p_ptr, T, N,
                   HAS_V0: tl.constexpr, HARD: tl.constexpr, SAVE_H: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs, mask = _neurons(N, BLOCK)
    thr = tl.load(p_ptr)
    reset = tl.load(p_ptr + 1)
    rest = tl.load(p_ptr + 2)
    if HAS_V0:
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0)
    else:
        v = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty) + rest
    # Pointers advance by N per step (64-bit pointer arithmetic: no int32 overflow of t * N).
    xp = x_ptr + offs
    sp = s_ptr + offs
    hp = h_ptr + offs
    for _t in range(T):
        h = v + tl.load(xp, mask=mask, other=0.0).to(v.dtype)
        fire = h >= thr
        s = tl.where(fire, 1.0, 0.0).to(v.dtype)
        s = tl.where(h != h, h, s)  # a NaN potential emits a NaN spike
        tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE_H:
            tl.store(hp, h, mask=mask)
            hp += N
        xp += N
        sp += N
        if HARD:
            v = tl.where(fire, reset, h)
        else:
            v = tl.where(fire, h - thr, h)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _if_bwd_kernel(h_ptr, gs_ptr, gv_ptr, gx_ptr, gv0_ptr, p_ptr, T, N, last_row,
                   HAS_GV: tl.constexpr, HARD: tl.constexpr, SIGMOID: tl.constexpr,
                   DETACH: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _neurons(N, BLOCK)
    thr = tl.load(p_ptr)
    reset = tl.load(p_ptr + 1)
    alpha = tl.load(p_ptr + 3)
    k_atan = tl.load(p_ptr + 4)
    half_alpha = tl.load(p_ptr + 5)
    if HAS_GV:
        c = tl.load(gv_ptr + offs, mask=mask, other=0.0)
    else:
        c = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty)
    # Walk back from row T-1 (its offset last_row = (T-1) N computed on the host, 64-bit).
    hp = h_ptr + last_row + offs
    gsp = gs_ptr + last_row + offs
    gxp = gx_ptr + last_row + offs
    for _i in range(T):
        h = tl.load(hp, mask=mask, other=0.0)
        u = h - thr
        if SIGMOID:
            e = tl.exp(-alpha * tl.abs(u))
            d = 1.0 + e
            sg = alpha * e / (d * d)
        else:
            z = u * k_atan
            sg = half_alpha / (1.0 + z * z)
        if HARD:
            dvdh = tl.where(h >= thr, 0.0, 1.0).to(h.dtype)
            if not DETACH:
                dvdh = dvdh + (reset - h) * sg
        else:
            if DETACH:
                dvdh = tl.zeros([BLOCK], dtype=h.dtype) + 1.0
            else:
                dvdh = 1.0 - thr * sg
        gs = tl.load(gsp, mask=mask, other=0.0).to(h.dtype)
        g = gs * sg + c * dvdh
        tl.store(gxp, g.to(gx_ptr.dtype.element_ty), mask=mask)
        c = g
        hp -= N
        gsp -= N
        gxp -= N
    tl.store(gv0_ptr + offs, c, mask=mask)


def _params(sd: torch.dtype, device: torch.device, v_threshold: float, v_reset: float,
            hard: bool, alpha: float) -> Tensor:
    rest = v_reset if hard else 0.0
    vals = (v_threshold, v_reset, rest, alpha, math.pi / 2 * alpha, alpha / 2)
    return _params_cached(sd, str(device), vals)


@functools.lru_cache(maxsize=64)
def _params_cached(sd: torch.dtype, device: str, vals: tuple) -> Tensor:
    """One small device tensor per parameter set: no host-to-device copy per call.

    Thread-safe: functools.lru_cache keeps its bookkeeping consistent under concurrent calls (two
    threads may both build a missing entry; one is kept), and the tensor is only ever read."""
    return torch.tensor(vals, dtype=sd, device=device)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def if_fwd_triton(x: Tensor, v_init: Optional[Tensor], v_threshold: float, hard_reset: bool,
                  v_reset: float, save_h: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """x: contiguous ``(T, N)``; v_init: ``(N,)`` in the state dtype or None.

    Returns spikes ``(T, N)`` in x's dtype, the final potential ``(N,)`` and, when ``save_h``,
    the pre-reset potentials ``(T, N)`` (state dtype) for :func:`if_bwd_triton`."""
    T, N = x.shape
    sd = _state_dtype(x.dtype)
    spikes = torch.empty_like(x)
    v = torch.empty(N, dtype=sd, device=x.device)
    h = torch.empty((T, N), dtype=sd, device=x.device) if save_h else v
    p = _params(sd, x.device, v_threshold, v_reset, hard_reset, 1.0)
    grid = (triton.cdiv(N, BLOCK),)
    _if_fwd_kernel[grid](x, v_init if v_init is not None else v, spikes, v, h, p, T, N,
                         HAS_V0=v_init is not None, HARD=hard_reset, SAVE_H=save_h, BLOCK=BLOCK)
    return spikes, v, (h if save_h else None)


def if_bwd_triton(h: Tensor, grad_spikes: Tensor, grad_v: Optional[Tensor], v_threshold: float,
                  hard_reset: bool, v_reset: float, surrogate: int, alpha: float,
                  detach_reset: bool) -> tuple[Tensor, Tensor]:
    """h: ``(T, N)`` saved by the forward; grad_spikes: contiguous ``(T, N)`` in x's dtype;
    grad_v: ``(N,)`` state dtype or None. Returns (grad_x in grad_spikes' dtype, grad_v_init)."""
    T, N = h.shape
    gx = torch.empty_like(grad_spikes)
    gv0 = torch.empty(N, dtype=h.dtype, device=h.device)
    p = _params(h.dtype, h.device, v_threshold, v_reset, hard_reset, alpha)
    grid = (triton.cdiv(N, BLOCK),)
    _if_bwd_kernel[grid](h, grad_spikes, grad_v if grad_v is not None else gv0, gx, gv0, p, T, N,
                         (T - 1) * N, HAS_GV=grad_v is not None, HARD=hard_reset,
                         SIGMOID=surrogate == 1,
                         DETACH=detach_reset, BLOCK=BLOCK)
    return gx, gv0
