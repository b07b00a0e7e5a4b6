"""Triton backend of the fused KD loss: loss and d loss/d student (and teacher) in one launch.

Math (spec: kdengine/ops/kd_loss/reference.py and the backend contract in kdengine/ops/kd_loss/op.py).
Per row r, a = s/T, b = t/T, q = softmax(a) (student), p = softmax(b) (teacher). All exponentials
are base 2 on prescaled logits, z = (x - max x) * log2(e)/T, so q_i = 2^z_i / S and
log2 q_i = z_i - log2 S; divergences are accumulated in log2 units and multiplied by ln 2 once:
  forward KL  D = sum p (log p - log q)    dD/da = q - p             dD/db = p (log p - log q - D)
  reverse KL  D = sum q (log q - log p)    dD/da = q (log q - log p - D)   dD/db = p - q
  JSD(beta)   log m = logaddexp(log p + log beta, log q + log(1 - beta))
              D = beta KL(p||m) + (1-beta) KL(q||m); dD/da = (1-beta) q (log q - log m - KL(q||m)),
              dD/db = beta p (log p - log m - KL(p||m))
  T = inf     d = s - t on the V' entries not -inf in both; dc = d - mean(d);
              KD = k sum dc^2 / (2 V'), dKD/ds = k dc / V' = -dKD/dt (k = 1, or beta(1-beta) for JSD)
  hard CE     q1 = softmax(s) (T = 1): CE = -(1-eps) log q1_y - eps/V sum log q1,
              dCE/ds_i = q1_i - (1-eps)[i == y] - eps/V
  L_r = w_r (alpha CE + K D), K = (1 - alpha) T^2 (or 1 - alpha without scale_t2 / at T = inf);
  grad_s = nrm w_r (alpha dCE/ds + K/T dD/da), grad_t = nrm w_r K/T dD/db.
Zero-probability terms contribute 0 (selected away with tl.where, never 0 * log 0), so -inf
masking gives finite results; NaN anywhere in a kept row makes its loss and gradient row NaN
through an explicit flag (sum of where(x == x, 0, x)), because max tricks may drop NaN.

Precision: everything is written in x_i = log2(p_i / q_i). When the teacher is close to the
student (the usual late-training case) q - p, log q - log p - D etc. cancel; computing them as
differences of separately rounded probabilities or log-probabilities loses up to all digits
(bf16/fp16 gradients then miss by many ulps). Instead pass 1 also accumulates
U/Sa = sum_i q_i (2^((t_i - s_i) c) - 1), each term exact relative to itself (expm1 series), so
L = log2(sum 2^(t c) / sum 2^(s c)) = log2(1 + U/Sa) keeps its digits, and x_i = -(s_i - t_i) c - L
is exact where it matters (s - t is exact for nearby logits). Then q - p = -q (2^x - 1) with an
accurate 2^x - 1, reverse KL uses q (-x - D), JSD log q - log m = -log2(1 + beta (2^x - 1)).
Rows where |U/Sa| > 1/2 (distributions far apart, or an entry only the teacher has) take
x_i = log2 p_i - log2 q_i from the max-shifted logits instead; there nothing cancels badly.

Layout: student/teacher (N, V) contiguous, one program per row, int64 row offsets (N*V may exceed
2^31), the row streamed in BLOCK-wide chunks. Pass 1 keeps per-lane online max/sum-of-exp2 for
s/T, t/T, U and (hard CE, T != 1) s at T = 1 -- one exp2 per element and statistic, no
cross-lane reduction inside the loop -- and combines the lanes once at the end. The last pass
rebuilds the probabilities, accumulates D and writes the gradients, formed in fp32 (fp64 for
fp64 inputs) and rounded once to the input dtype. Reverse KL, JSD and a teacher gradient need D
before any gradient element, so they add one pass that only accumulates D. T = inf: pass 1 gets
mean(d) and V', pass 2 the loss and gradients.

Memory traffic per element (b = bytes of the input dtype): forward KL, student gradient only:
2 reads of s and t + 1 write = 5b (the two-pass floor); + 2b for the extra D pass; + b for the
teacher gradient. Per-row losses go to an fp32 (fp64) buffer of N values, reduced with torch
(deterministic); the batchmean/mean count comes from the labels on device (no host sync).
Ignored rows only write their zero gradient (b per element).
"""
from __future__ import annotations

import math
import os
import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdengine.ops.kd_loss.config import Divergence, KDConfig, Reduction

__all__ = ["kd_loss_triton", "launch_config", "BLOCK_ENV"]

#: Environment variable forcing the chunk width (a power of two), e.g. for tests that must
#: exercise the multi-block loop on tiny vocabularies.
BLOCK_ENV = "KDENGINE_TRITON_KD_BLOCK"
# Override of the chunk width that wins over the environment variable (None: the heuristic); set
# through kdengine.testing.triton_kd_block.
_FORCE_BLOCK: Optional[int] = None

_LOG2E = 1.4426950408889634


def _f32(x: float) -> float:
    """x rounded to the nearest float32 (inf on overflow)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _split(x: float, f64: bool) -> tuple[float, float]:
    """x as hi + lo with both parts float32-representable.

    Triton passes Python floats to kernels as fp32 scalars; the fp64 path rebuilds the double as
    hi + lo in fp64 (~48 significant bits, enough for gradcheck), the fp32 path uses hi only.
    """
    hi = _f32(x)
    if not f64 or not math.isfinite(hi):
        return hi, 0.0
    return hi, _f32(x - hi)


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _param(hi, lo, DT: tl.constexpr):
    """A scalar kernel parameter passed as fp32 hi + lo, rebuilt in the math dtype."""
    return tl.cast(hi, DT) + tl.cast(lo, DT)


@triton.jit
def _online(x, m, s, c):
    """Per-lane online max m and sum s of 2^((x - m) c) after one more element x per lane.

    One exp2 per element: e is either the rescale of the old sum (new maximum) or the new term.
    x = -inf adds nothing (and avoids -inf - -inf); a NaN x turns s into NaN.
    """
    e = tl.where(x == float("-inf"), 0.0, tl.exp2(-tl.abs(x - m) * c))
    up = x > m
    s = tl.where(up, s * e + 1.0, s + e)
    m = tl.where(up, x, m)
    return m, s


@triton.jit
def _combine(m, s, c):
    """Row max and sum of 2^((x - max) c) from the per-lane (m, s) of _online."""
    mx = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, s * tl.exp2((m - mx) * c))
    return mx, tl.sum(w, axis=0)


@triton.jit
def _expm1_2(x, DT: tl.constexpr):
    """2^x - 1, accurate relative to itself near x = 0 (Taylor in y = x ln 2 for |x| < 1/4).

    Differences like q - p = -q (2^x - 1), x = log2(p/q), lose no digits this way when p ~ q.
    (Python float literals become constants of the math dtype, so the coefficients are exact
    enough for fp64 too; fp64 takes more terms.)
    """
    y = x * 0.6931471805599453
    if DT == tl.float64:
        t = 1.0 + y * (1.0 / 12.0)
        for k in tl.static_range(11, 1, -1):
            t = 1.0 + (y * (1.0 / k)) * t
        ser = y * t
    else:
        ser = y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (
            1.0 / 120.0 + y * (1.0 / 720.0 + y * (1.0 / 5040.0)))))))
    return tl.where(tl.abs(x) < 0.25, ser, tl.exp2(x) - 1.0)


@triton.jit
def _log1p_2(u, DT: tl.constexpr):
    """log2(1 + u), accurate relative to itself near u = 0 (atanh series for |u| < 1/8)."""
    w = u / (2.0 + u)
    w2 = w * w
    if DT == tl.float64:
        t = w2 * (1.0 / 15.0)
        for k in tl.static_range(13, 1, -2):
            t = w2 * ((1.0 / k) + t)
    else:
        t = w2 * (1.0 / 3.0 + w2 * (1.0 / 5.0 + w2 * (1.0 / 7.0)))
    ser = (2.0 * 1.4426950408889634) * w * (1.0 + t)
    return tl.where(tl.abs(u) < 0.125, ser, tl.log2(1.0 + u))


@triton.jit
def _log2_mix(lp, lq, l2b, l2nb):
    """log2(beta p + (1 - beta) q) from log2 p, log2 q: logaddexp in base 2, -inf if both are."""
    u = lp + l2b
    w = lq + l2nb
    hi = tl.maximum(u, w)
    lo = tl.minimum(u, w)
    return tl.where(hi == float("-inf"), float("-inf"), hi + tl.log2(1.0 + tl.exp2(lo - hi)))


@triton.jit
def _store(ptr, val, msk, RNE_BF16: tl.constexpr):
    """Store fp32/fp64 values rounded once to the output dtype.

    The interpreter truncates fp32 -> bf16; RNE_BF16 rounds to nearest-even by hand there (the
    GPU's native conversion already rounds to nearest-even).
    """
    if RNE_BF16:
        u = val.to(tl.float32).to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        tl.store(ptr, (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=msk)
    else:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=msk)


# --------------------------------------------------------------------------- the kernel


@triton.jit
def _pair(s, t, mx_a, mx_b, c, l2a, l2b, ia, ib, ds, dt, kx):
    """Per element: q, p, log2 q, log2 p and x = log2(p / q) of the current chunk.

    x = kx - ((s - ds) - (t - dt)) c. Close rows (ds = dt = 0, kx = -L): s - t is exact for
    nearby logits, so x keeps its digits where p ~ q. Other rows (ds, dt = the row maxima,
    kx = log2 Sa - log2 Sb): x = log2 p - log2 q, exact near the maxima.
    """
    za = (s - mx_a) * c
    zb = (t - mx_b) * c
    q = tl.exp2(za) * ia
    p = tl.exp2(zb) * ib
    x = kx - ((s - ds) - (t - dt)) * c
    return q, p, za - l2a, zb - l2b, x


@triton.jit
def _jsd_r(x, em, lq, lp, beta, l2beta, l2nbeta, DT: tl.constexpr):
    """JSD: (log2 q - log2 m, log2 p - log2 m); near p ~ q from x and em = 2^x - 1 exactly
    (log2 q - log2 m = -log2(1 + beta (2^x - 1))), elsewhere from logaddexp."""
    small = tl.abs(x) < 1.0
    lm = _log2_mix(lp, lq, l2beta, l2nbeta)
    rq_s = -_log1p_2(beta * tl.where(small, em, 0.0), DT)
    rq = tl.where(small, rq_s, lq - lm)
    rp = tl.where(small, rq_s + x, lp - lm)
    return rq, rp


@triton.jit
def _tile(s_row, t_row, off, lanes, V, DT: tl.constexpr):
    """The chunk of columns ``off + lanes`` of a row: (cols, cols < V, s, t), s and t in DT and
    -inf past the row's end, so they drop out of every max, sum and probability."""
    cols = off + lanes
    msk = cols < V
    s = tl.load(s_row + cols, mask=msk, other=float("-inf")).to(DT)
    t = tl.load(t_row + cols, mask=msk, other=float("-inf")).to(DT)
    return cols, msk, s, t


@triton.jit
def _ce_grad(g_s, acc_l, q1, s, cols, msk, y, mx_1, eps, g_ce, V, HAS_EPS: tl.constexpr):
    """Adds the hard-CE gradient of a chunk, g_ce (q1 - (1 - eps)[i == y] - eps / V), to g_s and,
    with label smoothing, the chunk's sum of s - max s to acc_l."""
    g_s += g_ce * (q1 - tl.where(cols == y, 1.0 - eps, 0.0) - eps / V)
    if HAS_EPS:
        acc_l += tl.where(msk, s - mx_1, 0.0)
    return g_s, acc_l


@triton.jit
def _store_grads(gs_row, gt_row, cols, msk, g_s, g_t, nan_flag, NEED_GT: tl.constexpr,
                 RNE_BF16: tl.constexpr):
    """Writes a chunk of the student (and teacher) gradient, NaN for a row holding a NaN."""
    _store(gs_row + cols, g_s + nan_flag, msk, RNE_BF16)
    if NEED_GT:
        _store(gt_row + cols, g_t + nan_flag, msk, RNE_BF16)


@triton.jit
def _kd_loss_kernel(
    s_ptr, t_ptr, lab_ptr, gs_ptr, gt_ptr, rows_ptr, nrm_ptr,
    V, ignore_index,
    c_hi, c_lo,  # log2(e) / T (finite T)
    kl_hi, kl_lo,  # coefficient of D in the row loss: K, or (1 - alpha) k at T = inf
    kg_hi, kg_lo,  # coefficient of dD/da in the gradient before nrm: K / T, or (1 - alpha) k
    al_hi, al_lo,  # alpha = hard_weight
    ep_hi, ep_lo,  # eps = label_smoothing
    be_hi, be_lo,  # beta (JSD)
    DIV: tl.constexpr, T_INF: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CE: tl.constexpr,
    CE_SHARE: tl.constexpr, HAS_EPS: tl.constexpr, NEED_GT: tl.constexpr, PRE_D: tl.constexpr,
    BLOCK: tl.constexpr, DT: tl.constexpr, RNE_BF16: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    s_row = s_ptr + base
    t_row = t_ptr + base
    gs_row = gs_ptr + base
    gt_row = gt_ptr + base
    lanes = tl.arange(0, BLOCK)

    if HAS_LABELS:
        y = tl.load(lab_ptr + row)
        skip = y == ignore_index
    else:
        y = row * 0 - 1
        skip = row < 0

    if skip:
        # Ignored row: loss 0 and exact zero gradients, whatever the row holds (even NaN).
        zero = tl.zeros((BLOCK,), DT)
        for off in range(0, V, BLOCK):
            cols = off + lanes
            msk = cols < V
            _store(gs_row + cols, zero, msk, RNE_BF16)
            if NEED_GT:
                _store(gt_row + cols, zero, msk, RNE_BF16)
        tl.store(rows_ptr + row, 0.0)
    else:
        nrm = tl.load(nrm_ptr)
        c = _param(c_hi, c_lo, DT)
        kl = _param(kl_hi, kl_lo, DT)
        kg = _param(kg_hi, kg_lo, DT) * nrm
        alpha = _param(al_hi, al_lo, DT)
        eps = _param(ep_hi, ep_lo, DT)
        beta = _param(be_hi, be_lo, DT)
        g_ce = alpha * nrm

        # ---- pass 1: per-lane row statistics
        m_s = tl.full((BLOCK,), NEG_INF, DT)  # running max of s (shared by T and T = 1)
        m_t = tl.full((BLOCK,), NEG_INF, DT)
        sum_a = tl.zeros((BLOCK,), DT)  # sum 2^((s - m_s) c): student at T
        sum_1 = tl.zeros((BLOCK,), DT)  # student at T = 1 (hard CE)
        sum_b = tl.zeros((BLOCK,), DT)  # teacher at T
        sum_u = tl.zeros((BLOCK,), DT)  # sum 2^((s - m_s) c) (2^((t - s) c) - 1): see below
        sum_d = tl.zeros((BLOCK,), DT)  # T = inf: sum of s - t over kept entries
        n_keep = tl.zeros((BLOCK,), DT)  # T = inf: V'
        nanv = tl.zeros((BLOCK,), DT)  # NaN iff the row holds a NaN
        for off in range(0, V, BLOCK):
            cols, msk, s, t = _tile(s_row, t_row, off, lanes, V, DT)
            nanv += tl.where(s == s, 0.0, s) + tl.where(t == t, 0.0, t)
            if T_INF:
                keep = msk & ((s != NEG_INF) | (t != NEG_INF))
                sum_d += tl.where(keep, s - t, 0.0)
                n_keep += keep.to(DT)
                if HAS_CE:
                    m_s, sum_1 = _online(s, m_s, sum_1, LOG2E)
            else:
                up = s > m_s
                s_inf = s == NEG_INF
                e = tl.where(s_inf, 0.0, tl.exp2(-tl.abs(s - m_s) * c))
                if HAS_CE and not CE_SHARE:
                    e1 = tl.where(s_inf, 0.0, tl.exp2(-tl.abs(s - m_s) * LOG2E))
                    sum_1 = tl.where(up, sum_1 * e1 + 1.0, sum_1 + e1)
                # U / Sa = sum_i q_i (2^((t_i - s_i) c) - 1) = Sb'/Sa' - 1 (unshifted sums), each
                # term exact relative to itself, so L = log2(1 + U/Sa) keeps its digits when
                # the teacher is close to the student. An entry only the teacher has (s = -inf)
                # poisons U with NaN: that row takes the general path.
                em1 = _expm1_2((t - s) * c, DT)
                term = tl.where(s_inf, tl.where(t == NEG_INF, 0.0, float("nan")), em1)
                sum_u = tl.where(up, sum_u * e + term, sum_u + e * term)
                sum_a = tl.where(up, sum_a * e + 1.0, sum_a + e)
                m_s = tl.where(up, s, m_s)
                m_t, sum_b = _online(t, m_t, sum_b, c)
        nan_flag = tl.sum(nanv, axis=0)

        # ---- row statistics
        mx_a = 0.0
        l2a = 0.0
        ia = 0.0
        if not T_INF:
            mx_a, s_a = _combine(m_s, sum_a, c)
            l2a = tl.log2(s_a)
            ia = 1.0 / s_a
        # Hard CE: the T = 1 normaliser and log q1 at the label.
        mx_1 = 0.0
        l21 = 0.0
        i1 = 0.0
        logq1_y = 0.0
        if HAS_CE:
            if CE_SHARE:
                mx_1, l21, i1 = mx_a, l2a, ia
            else:
                mx_1, s_1 = _combine(m_s, sum_1, LOG2E)
                l21 = tl.log2(s_1)
                i1 = 1.0 / s_1
            y_ok = (y >= 0) & (y < V)
            s_y = tl.load(s_row + tl.where(y_ok, y, 0)).to(DT)
            logq1_y = (s_y - mx_1) - LN2 * l21
            # A label outside [0, V) (compiled graphs skip the eager check): NaN row, no OOB read.
            nan_flag += tl.where(y_ok, 0.0, float("nan"))

        acc = tl.zeros((BLOCK,), DT)  # D (log2 units), or sum dc^2 at T = inf
        acc_q = tl.zeros((BLOCK,), DT)  # JSD: KL(q || m)
        acc_p = tl.zeros((BLOCK,), DT)  # JSD: KL(p || m)
        acc_l = tl.zeros((BLOCK,), DT)  # sum_i (s_i - max s): eps / V sum log q1
        g_zero = tl.zeros((BLOCK,), DT)

        if T_INF:
            nk = tl.sum(n_keep, axis=0)
            mean_d = tl.sum(sum_d, axis=0) / nk
            kg_n = kg / nk
            # ---- pass 2 (T = inf): loss and gradients
            for off in range(0, V, BLOCK):
                cols, msk, s, t = _tile(s_row, t_row, off, lanes, V, DT)
                keep = msk & ((s != NEG_INF) | (t != NEG_INF))
                dc = tl.where(keep, (s - t) - mean_d, 0.0)
                acc += dc * dc
                g = kg_n * dc
                g_s = g
                if HAS_CE:
                    q1 = tl.exp2((s - mx_1) * LOG2E) * i1
                    g_s, acc_l = _ce_grad(g_s, acc_l, q1, s, cols, msk, y, mx_1, eps, g_ce, V, HAS_EPS)
                _store_grads(gs_row, gt_row, cols, msk, g_s, -g, nan_flag, NEED_GT, RNE_BF16)
            kd = kl * tl.sum(acc, axis=0) / (2.0 * nk)
        else:
            mx_b, s_b = _combine(m_t, sum_b, c)
            l2b = tl.log2(s_b)
            ib = 1.0 / s_b
            # x = log2(p/q) per element: close rows use L = log2(1 + U/Sa), others log2 Sa/Sb.
            r = tl.sum(sum_u * tl.exp2((m_s - mx_a) * c), axis=0) * ia
            close = tl.abs(r) <= 0.5
            big_l = _log1p_2(tl.where(close, r, 0.0), DT)
            ds = tl.where(close, 0.0, mx_a)
            dt = tl.where(close, 0.0, mx_b)
            kx = tl.where(close, -big_l, l2a - l2b)
            l2beta = 0.0
            l2nbeta = 0.0
            if DIV == 2:
                l2beta = tl.log2(beta)
                l2nbeta = tl.log2(1.0 - beta)
            d2 = 0.0
            kq2 = 0.0
            kp2 = 0.0
            # ---- optional pass: D before any gradient (reverse KL, JSD, teacher gradient)
            if PRE_D:
                for off in range(0, V, BLOCK):
                    cols, msk, s, t = _tile(s_row, t_row, off, lanes, V, DT)
                    q, p, lq, lp, x = _pair(s, t, mx_a, mx_b, c, l2a, l2b, ia, ib, ds, dt, kx)
                    if DIV == 0:
                        acc += tl.where(p > 0.0, p * x, 0.0)
                    elif DIV == 1:
                        acc -= tl.where(q > 0.0, q * x, 0.0)
                    else:
                        em = _expm1_2(x, DT)
                        rq, rp = _jsd_r(x, em, lq, lp, beta, l2beta, l2nbeta, DT)
                        acc_q += tl.where(q > 0.0, q * rq, 0.0)
                        acc_p += tl.where(p > 0.0, p * rp, 0.0)
                d2 = tl.sum(acc, axis=0)
                kq2 = tl.sum(acc_q, axis=0)
                kp2 = tl.sum(acc_p, axis=0)
            # ---- last pass: gradients (and D for forward KL without teacher gradient)
            kg_ln2 = kg * LN2
            for off in range(0, V, BLOCK):
                cols, msk, s, t = _tile(s_row, t_row, off, lanes, V, DT)
                q, p, lq, lp, x = _pair(s, t, mx_a, mx_b, c, l2a, l2b, ia, ib, ds, dt, kx)
                small = tl.abs(x) < 1.0
                em = _expm1_2(x, DT)
                g_t = g_zero
                if DIV == 0:
                    if not PRE_D:
                        acc += tl.where(p > 0.0, p * x, 0.0)
                    g_s = kg * tl.where(small, -q * em, q - p)  # q - p
                    if NEED_GT:
                        g_t = kg_ln2 * tl.where(p > 0.0, p * (x - d2), 0.0)
                elif DIV == 1:
                    g_s = kg_ln2 * tl.where(q > 0.0, q * (-x - d2), 0.0)
                    if NEED_GT:
                        g_t = kg * tl.where(small, q * em, p - q)  # p - q
                else:
                    rq, rp = _jsd_r(x, em, lq, lp, beta, l2beta, l2nbeta, DT)
                    g_s = (kg_ln2 * (1.0 - beta)) * tl.where(q > 0.0, q * (rq - kq2), 0.0)
                    if NEED_GT:
                        g_t = (kg_ln2 * beta) * tl.where(p > 0.0, p * (rp - kp2), 0.0)
                if HAS_CE:
                    if CE_SHARE:
                        q1 = q
                    else:
                        q1 = tl.exp2((s - mx_1) * LOG2E) * i1
                    g_s, acc_l = _ce_grad(g_s, acc_l, q1, s, cols, msk, y, mx_1, eps, g_ce, V, HAS_EPS)
                _store_grads(gs_row, gt_row, cols, msk, g_s, g_t, nan_flag, NEED_GT, RNE_BF16)
            if not PRE_D:
                d2 = tl.sum(acc, axis=0)
            if DIV == 2:
                d2 = beta * kp2 + (1.0 - beta) * kq2
            kd = kl * LN2 * d2

        loss = kd + nan_flag
        if HAS_CE:
            ce = -logq1_y
            if HAS_EPS:
                sum_logq1 = tl.sum(acc_l, axis=0) - V * (LN2 * l21)
                ce = -(1.0 - eps) * logq1_y - (eps / V) * sum_logq1
            loss += alpha * ce
        tl.store(rows_ptr + row, loss)


# --------------------------------------------------------------------------- host side


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_config(v: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps) for a vocabulary of ``v`` entries of ``dtype``.

    Override order: :func:`kdengine.testing.triton_kd_block`, then ``KDENGINE_TRITON_KD_BLOCK``
    (a power of two).
    GPU: chunks of up to 2048 elements (1024 in fp64) with 8 warps: 8 elements per thread and
    input (one 16-byte load for bf16/fp16), ~7 per-lane accumulators, so registers stay low
    enough for two programs per SM to keep loads in flight. Untuned (no GPU was available
    when this was written): check with kdengine.bench.kd_gpu. Interpreter: one big chunk (its
    cost is per loop iteration, not per element).
    """
    forced = _FORCE_BLOCK
    if forced is None:
        env = os.environ.get(BLOCK_ENV, "").strip()
        if env:
            try:
                forced = int(env)
            except ValueError:
                raise ValueError(f"{BLOCK_ENV} must be a power of two, got {env!r}") from None
    if forced is not None:
        if forced < 1 or forced & (forced - 1):
            raise ValueError(f"the forced Triton KD block ({BLOCK_ENV} / kdengine.testing.triton_kd_block) must be a "
                             f"power of two >= 1, got {forced}")
        block = int(forced)
    elif _interpreting():
        block = min(max(_next_pow2(v), 16), 1024)
    else:
        cap = 1024 if dtype == torch.float64 else 2048
        block = min(max(_next_pow2(v), 16), cap)
    num_warps = 8 if block >= 1024 else (4 if block >= 256 else 2)
    return block, num_warps


def _check_inputs(student: Tensor, teacher: Tensor, labels: Optional[Tensor]) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"{name} must be float32/bfloat16/float16/float64, got {x.dtype}")
        if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must have shape (N, V) with N, V >= 1, got {tuple(x.shape)}")
    if teacher.shape != student.shape or teacher.dtype != student.dtype:
        raise ValueError(f"teacher must match student: {tuple(teacher.shape)} {teacher.dtype} vs "
                         f"{tuple(student.shape)} {student.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device}, student on {student.device}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
            raise TypeError("labels must be an int64 tensor of shape (N,)")
        if tuple(labels.shape) != (student.shape[0],) or labels.device != student.device:
            raise ValueError(f"labels must have shape ({student.shape[0]},) on {student.device}, "
                             f"got {tuple(labels.shape)} on {labels.device}")


def kd_loss_triton(
    student: Tensor, teacher: Tensor, labels: Optional[Tensor], cfg: KDConfig
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Fused KD loss and gradients with Triton (the ``"triton"`` backend of ``kd_loss``).

    Args:
        student, teacher: ``(N, V)`` logits, one dtype in {float32, bfloat16, float16, float64},
            on a CUDA device (or on CPU under ``TRITON_INTERPRET=1``).
        labels: ``(N,)`` int64 class indices or None (needed when ``cfg.hard_weight > 0``).
        cfg: the validated :class:`~kdengine.ops.kd_loss.config.KDConfig`.

    Returns:
        ``(loss, grad_student, grad_teacher)``: loss float32 (float64 for float64 inputs), 0-dim
        or ``(N,)`` for reduction ``none``; gradients ``(N, V)`` in the input dtype, the teacher's
        None unless ``cfg.need_teacher_grad``.
    """
    _check_inputs(student, teacher, labels)
    if cfg.hard_weight > 0.0 and labels is None:
        raise ValueError("hard_weight > 0 needs labels")
    dev = student.device
    if dev.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the triton kd_loss backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, "
            f"set before triton is imported); got {dev.type} tensors"
        )
    student = student.contiguous()
    teacher = teacher.contiguous()
    n, v = student.shape
    f64 = student.dtype == torch.float64
    acc_dtype = torch.float64 if f64 else torch.float32

    temp = float(cfg.temperature)
    t_inf = math.isinf(temp)
    alpha = float(cfg.hard_weight)
    div = int(cfg.divergence)
    beta = float(cfg.beta) if div == Divergence.JSD else 0.5
    if t_inf:
        k = beta * (1.0 - beta) if div == Divergence.JSD else 1.0
        c, kl, kg = 0.0, (1.0 - alpha) * k, (1.0 - alpha) * k
    else:
        kl = cfg.kd_coef
        c, kg = _LOG2E / temp, kl / temp
    has_labels = labels is not None
    has_ce = alpha > 0.0
    eps = float(cfg.label_smoothing) if has_ce else 0.0

    # Normaliser of the reduced loss, on device: nrm multiplies every gradient element.
    red = cfg.reduction
    denom = None
    if red in (Reduction.BATCHMEAN, Reduction.MEAN):
        if has_labels:
            count = (labels != cfg.ignore_index).sum().to(acc_dtype)
        else:
            count = torch.full((), float(n), dtype=acc_dtype, device=dev)
        denom = count.clamp(min=1.0)
        if red == Reduction.MEAN:
            denom = denom * v
        nrm = 1.0 / denom
    else:
        nrm = torch.ones((), dtype=acc_dtype, device=dev)

    rows = torch.empty(n, dtype=acc_dtype, device=dev)
    grad_s = torch.empty_like(student)
    grad_t = torch.empty_like(teacher) if cfg.need_teacher_grad else None
    block, num_warps = launch_config(v, student.dtype)
    rne_bf16 = _interpreting() and student.dtype == torch.bfloat16
    pre_d = (not t_inf) and (div != Divergence.FORWARD_KL or cfg.need_teacher_grad)

    args = [
        student, teacher, labels if has_labels else rows, grad_s,
        grad_t if grad_t is not None else grad_s, rows, nrm, v, int(cfg.ignore_index),
    ]
    for x in (c, kl, kg, alpha, eps, beta):
        args.extend(_split(x, f64))
    meta = dict(
        DIV=div, T_INF=t_inf, HAS_LABELS=has_labels, HAS_CE=has_ce, CE_SHARE=has_ce and temp == 1.0,
        HAS_EPS=has_ce and eps > 0.0,
        NEED_GT=grad_t is not None, PRE_D=pre_d, BLOCK=block,
        DT=tl.float64 if f64 else tl.float32, RNE_BF16=rne_bf16,
    )
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            _kd_loss_kernel[(n,)](*args, **meta, num_warps=num_warps)
    else:
        # The interpreter runs on numpy, which warns about the -inf - -inf and 0 * inf lanes
        # that the kernel computes and then discards with tl.where (the GPU does not warn).
        import numpy as np

        with np.errstate(all="ignore"):
            _kd_loss_kernel[(n,)](*args, **meta)

    if red == Reduction.NONE:
        loss = rows
    else:
        loss = rows.sum()
        if denom is not None:
            loss = loss / denom
    return loss, grad_s, grad_t
