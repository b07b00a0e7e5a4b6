"""Triton multi-step leaky integrate-and-fire kernels: forward over all T steps, fused backward
through time that also returns per-neuron gradients of the leak and the threshold.

Math (per neuron; state in fp32, or fp64 for float64 input; see
kdengine/ops/lif_multistep/reference.py). params = [leak, theta, r]: leak is tau (DIVIDE) or the
decay factor k = 1/tau; r = v_reset for the hard reset, 0 for the reset by subtraction:

    h_t = v + (x_t - (v - r)) / tau  (or * k)   decay_input   |   v - (v - r) / tau + x_t
    u = h_t - theta;  s_t = [u >= 0] (NaN if u is NaN);  v_t = s_t ? h_t - theta (soft) | r (hard) : h_t
    backward, c = dL/dv_t from t = T-1 down to 0, q = 1/tau or k:
    g = gs_t sg(u) + c dv_t/dh_t;  dL/dx_t = g q (decay_input) or g;  c <- g - g q
    dL/dtheta_n += -sg (gs_t + c dv/ds) - c s_t [soft];  dL/dk_n += g dh_t/dk (needs v_{t-1})

Layout: x, spikes, h, grad_spikes, grad_x contiguous ``(T, N)``. One program owns BLOCK neurons
and loops over T with their potentials in registers: each step is one coalesced load of BLOCK
inputs and one store of BLOCK spikes.

Memory traffic (fp32, per element per step): forward 8 B (read x, write s) + 4 B to store h when a
backward follows; backward 12 B (read h and gs, write gx), +4 B reading x for the leak gradient
with decay_input. The parameter partials ``(2, N)`` are summed by torch afterwards (deterministic).
The leak, theta, r live in a tensor on the device (a learned tau needs no host sync); alpha and its
derived constants in a small cached tensor of the state dtype (a Python float would reach Triton
as fp32 and change float64 results).
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
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


@triton.jit
def _charge(v, x, leak, r, DECAY_INPUT: tl.constexpr, DIVIDE: tl.constexpr):
    if DECAY_INPUT:
        a = x - (v - r)
        if DIVIDE:
            h = v + a / leak
        else:
            h = v + a * leak
    else:
        d = v - r
        if DIVIDE:
            h = v - d / leak + x
        else:
            h = v - d * leak + x
    return h


@triton.jit
def _reset(h, thr, r, HARD: tl.constexpr):
    fire = (h - thr) >= 0
    if HARD:
        v = tl.where(fire, r, h)
    else:
        v = tl.where(fire, h - thr, h)
    return v


@triton.jit
def _lif_fwd_kernel(x_ptr, v0_ptr, p_ptr, s_ptr, v_ptr, h_ptr, T, N,
                    HAS_V0: tl.constexpr, HARD: tl.constexpr, DECAY_INPUT: tl.constexpr,
                    DIVIDE: tl.constexpr, SAVE_H: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _neurons(N, BLOCK)
    leak = tl.load(p_ptr)
    thr = tl.load(p_ptr + 1)
    r = tl.load(p_ptr + 2)
    if HAS_V0:
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0)
    else:
        v = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty) + r
    xp = x_ptr + offs
    sp = s_ptr + offs
    hp = h_ptr + offs
    for _t in range(T):
        h = _charge(v, tl.load(xp, mask=mask, other=0.0).to(v.dtype), leak, r, DECAY_INPUT, DIVIDE)
        u = h - thr
        s = tl.where(u >= 0, 1.0, 0.0).to(v.dtype)
        s = tl.where(u != u, u, s)  # a NaN potential emits a NaN spike
        tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE_H:
            tl.store(hp, h, mask=mask)
            hp += N
        xp += N
        sp += N
        v = _reset(h, thr, r, HARD)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _lif_bwd_kernel(h_ptr, gs_ptr, gv_ptr, x_ptr, v0_ptr, p_ptr, a_ptr, gx_ptr, gv0_ptr, gp_ptr,
                    T, N, last_row,
                    HAS_GV: tl.constexpr, HAS_V0: tl.constexpr, HARD: tl.constexpr,
                    SIGMOID: tl.constexpr, DETACH: tl.constexpr, DECAY_INPUT: tl.constexpr,
                    DIVIDE: tl.constexpr, PARAM_GRADS: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _neurons(N, BLOCK)
    leak = tl.load(p_ptr)
    thr = tl.load(p_ptr + 1)
    r = tl.load(p_ptr + 2)
    alpha = tl.load(a_ptr)
    k_atan = tl.load(a_ptr + 1)
    half_alpha = tl.load(a_ptr + 2)
    if HAS_GV:
        c = tl.load(gv_ptr + offs, mask=mask, other=0.0)
    else:
        c = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty)
    g_leak = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty)
    g_thr = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty)
    if HAS_V0:
        v_first = tl.load(v0_ptr + offs, mask=mask, other=0.0)
    else:
        v_first = tl.zeros([BLOCK], dtype=p_ptr.dtype.element_ty) + r
    hp = h_ptr + last_row + offs
    gsp = gs_ptr + last_row + offs
    gxp = gx_ptr + last_row + offs
    xp = x_ptr + last_row + offs
    for i in range(T):
        h = tl.load(hp, mask=mask, other=0.0)
        u = h - thr
        if SIGMOID:
            e = tl.exp(-alpha * tl.abs(u))
            d = 1.0 + e
            sg = alpha * e / (d * d)
        else:
            z = u * k_atan
            sg = half_alpha / (1.0 + z * z)
        fire = u >= 0
        if HARD:
            dvds = r - h
            dvdh = tl.where(fire, 0.0, 1.0).to(h.dtype)
        else:
            dvds = tl.zeros([BLOCK], dtype=h.dtype) - thr
            dvdh = tl.zeros([BLOCK], dtype=h.dtype) + 1.0
        if not DETACH:
            dvdh = dvdh + dvds * sg
        gs = tl.load(gsp, mask=mask, other=0.0).to(h.dtype)
        g = gs * sg + c * dvdh
        if DIVIDE:
            gq = g / leak
        else:
            gq = g * leak
        if DECAY_INPUT:
            tl.store(gxp, gq.to(gx_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(gxp, g.to(gx_ptr.dtype.element_ty), mask=mask)
        if PARAM_GRADS:
            if DETACH:
                dth = -sg * gs
            else:
                dth = -sg * (gs + c * dvds)
            if not HARD:
                dth = dth - tl.where(fire, c, 0.0)
            g_thr += dth
            # v_{t-1}: the reset of h_{t-1}, or the initial potential at t = 0 (i = T - 1)
            later = (tl.zeros([BLOCK], dtype=tl.int32) + i) < T - 1  # as a block-wide mask
            h_prev = tl.load(hp - N, mask=mask & later, other=0.0)
            v_prev = tl.where(later, _reset(h_prev, thr, r, HARD), v_first)
            if DECAY_INPUT:
                dhdk = tl.load(xp, mask=mask, other=0.0).to(h.dtype) - (v_prev - r)
            else:
                dhdk = -(v_prev - r)
            g_leak += g * dhdk
        c = g - gq
        hp -= N
        gsp -= N
        gxp -= N
        xp -= N
    tl.store(gv0_ptr + offs, c, mask=mask)
    if PARAM_GRADS:
        tl.store(gp_ptr + offs, g_leak, mask=mask)
        tl.store(gp_ptr + N + offs, g_thr, mask=mask)


@functools.lru_cache(maxsize=64)
def _alpha_params(sd: torch.dtype, device: str, alpha: float) -> Tensor:
    """alpha, pi/2 alpha, alpha/2 as one small device tensor per (dtype, device, alpha); only read."""
    return torch.tensor((alpha, math.pi / 2 * alpha, alpha / 2), dtype=sd, device=device)


def lif_fwd_triton(x: Tensor, v_init: Optional[Tensor], params: Tensor, hard_reset: bool,
                   decay_input: bool, divide: bool,
                   save_h: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """x: contiguous ``(T, N)``; v_init: ``(N,)`` in the state dtype or None; params ``(3,)``.

    Returns spikes ``(T, N)`` in x's dtype, the final potential ``(N,)`` and, when ``save_h``, the
    pre-reset potentials ``(T, N)`` (state dtype) for :func:`lif_bwd_triton`."""
    T, N = x.shape
    sd = params.dtype
    spikes = torch.empty_like(x)
    v = torch.empty(N, dtype=sd, device=x.device)
    h = torch.empty((T, N), dtype=sd, device=x.device) if save_h else v
    grid = (triton.cdiv(N, BLOCK),)
    _lif_fwd_kernel[grid](x, v_init if v_init is not None else v, params, spikes, v, h, T, N,
                          HAS_V0=v_init is not None, HARD=hard_reset, DECAY_INPUT=decay_input,
                          DIVIDE=divide, SAVE_H=save_h, BLOCK=BLOCK)
    return spikes, v, (h if save_h else None)


def lif_bwd_triton(x: Optional[Tensor], v_init: Optional[Tensor], h: Tensor, grad_spikes: Tensor,
                   grad_v: Optional[Tensor], params: Tensor, hard_reset: bool, decay_input: bool,
                   divide: bool, surrogate: int, alpha: float, detach_reset: bool,
                   param_grads: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """h: ``(T, N)`` saved by the forward; grad_spikes: contiguous ``(T, N)`` in x's dtype; x
    (needed for the leak gradient with decay_input) and v_init as in the forward.

    Returns (grad_x in grad_spikes' dtype, grad_v_init ``(N,)``, grad_params ``(2,)`` = d/d leak,
    d/d theta, or None without ``param_grads``)."""
    T, N = h.shape
    gx = torch.empty_like(grad_spikes)
    gv0 = torch.empty(N, dtype=h.dtype, device=h.device)
    gp = torch.empty((2, N) if param_grads else (0,), dtype=h.dtype, device=h.device)
    a = _alpha_params(h.dtype, str(h.device), float(alpha))
    use_x = param_grads and decay_input
    grid = (triton.cdiv(N, BLOCK),)
    _lif_bwd_kernel[grid](h, grad_spikes, grad_v if grad_v is not None else gv0,
                          x if use_x else h, v_init if v_init is not None else gv0, params, a,
                          gx, gv0, gp, T, N, (T - 1) * N,
                          HAS_GV=grad_v is not None, HAS_V0=v_init is not None, HARD=hard_reset,
                          SIGMOID=surrogate == 1, DETACH=detach_reset, DECAY_INPUT=decay_input,
                          DIVIDE=divide, PARAM_GRADS=param_grads, BLOCK=BLOCK)
    if not param_grads:
        return gx, gv0, None
    g = gp.sum(1)
    if divide:  # d/dtau = -d/dk / tau^2
        g[0] = -g[0] / (params[0] * params[0])
    return gx, gv0, g
