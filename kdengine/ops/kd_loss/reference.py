"""Reference (pure torch) temperature softmax-KL loss: the spec every backend is checked against.

Inputs are already validated and flattened by :mod:`kdengine.ops.kd_loss`: ``student`` and
``teacher`` are ``(N, V)``, ``labels`` is ``(N,)`` int64 or ``None``. Math runs in float64 for
every input dtype, and the result is rounded once to the caller's dtype: it is the oracle.

Per row r (a = s/T, b = t/T, q = softmax(a) the student, p = softmax(b) the teacher):

* forward KL  D = sum_i p_i (log p_i - log q_i)
* reverse KL  D = sum_i q_i (log q_i - log p_i)
* JSD(beta)   D = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
* KD_r = T^2 D when ``scale_t2`` else D.  At T = inf it is the exact limit of T^2 D
  (docs/papers.md section 1): k/(2V') * ||(s - t) - mean(s - t)||^2 over the V' entries that are not
  -inf in both inputs, k = 1 for the KLs and beta (1 - beta) for JSD.
* CE_r = -(1 - eps) log softmax(s)_y - eps/V sum_i log softmax(s)_i   (hard labels, T = 1)
* L_r = w_r (alpha CE_r + (1 - alpha) KD_r), w_r = 0 for rows whose label is ignore_index.

Terms with zero probability (entries at -inf) contribute 0, and so do their gradients.
Reductions: none -> L (N,); sum; batchmean -> sum / count; mean -> sum / (count V);
count = number of rows not ignored (0 rows give a loss of 0).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kdengine.ops.kd_loss.config import Divergence, KDConfig, Reduction


def _math_dtype(x: Tensor) -> torch.dtype:
    # Always float64: the reference is the oracle, and the plain formulas lose to cancellation
    # (p - q, log q - log p - D) in fp32 by more than the 1e-5 the kernels are held to (the kernels
    # avoid it with their close-distribution path and double-precision row statistics).
    return torch.float64


def _kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """sum_i p_i (log p_i - log q_i), with 0 * log 0 = 0 in value and gradient."""
    p = logp.exp()
    pos = p > 0
    lp = torch.where(pos, logp, torch.zeros_like(logp))
    lq = torch.where(pos, logq, torch.zeros_like(logq))
    return (p * (lp - lq)).sum(-1)


# Above this temperature the divergence is computed from the small log-ratios directly (below);
# kd_loss routes every backend there (the kernels keep their fused path up to it).
LARGE_T = 8.0


def _all_finite(student: Tensor, teacher: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    # Finite, or masked (-inf) in both inputs at the same entries (a shared vocabulary mask).
    ok = (torch.isfinite(student) & torch.isfinite(teacher)) | (
        torch.isneginf(student) & torch.isneginf(teacher))
    return bool(ok.all())


def _divergence_large_t(student: Tensor, teacher: Tensor, cfg: KDConfig) -> Tensor:
    """D for finite logits at large T without O(1) terms that cancel.

    The plain form sums p_i (log p_i - log q_i) with each log of size ~log V while D ~ 1/T^2:
    even float64 cancels to garbage by T ~ 1e6. Here rho_i = log p_i - log q_i is formed from the
    small differences d = (t - s)/T: with dbar = E_q[d], delta = d - dbar,
    rho = delta - log1p(E_q[expm1(delta)]) (exact), so every term is O(1/T) and the sums
    (whose result is O(1/T^2)) lose only a factor ~T of float64 precision.
    """
    t = cfg.temperature
    logq = torch.log_softmax(student / t, dim=-1)
    q = logq.exp()
    masked = torch.isneginf(student) & torch.isneginf(teacher)  # q = p = 0 there: no terms
    d = torch.where(masked, torch.zeros_like(student), teacher - student) / t
    dbar = (q * d).sum(-1, keepdim=True)
    delta = d - dbar
    rho = delta - torch.log1p((q * torch.expm1(delta)).sum(-1, keepdim=True))  # log p - log q
    p = q * rho.exp()
    if cfg.divergence == Divergence.FORWARD_KL:
        return (p * rho).sum(-1)
    if cfg.divergence == Divergence.REVERSE_KL:
        return -(q * rho).sum(-1)
    beta = cfg.beta
    pos = rho >= 0
    z = torch.where(pos, -rho, rho)  # -|rho|
    k = torch.where(pos, torch.full_like(rho, 1.0 - beta), torch.full_like(rho, beta))
    lm = -torch.log1p(k * torch.expm1(z))
    lpm = torch.where(pos, lm, lm + rho)  # log p - log m
    lqm = torch.where(pos, lm - rho, lm)  # log q - log m
    return beta * (p * lpm).sum(-1) + (1.0 - beta) * (q * lqm).sum(-1)


def kd_divergence(student: Tensor, teacher: Tensor, cfg: KDConfig) -> Tensor:
    """Per-row KD term KD_r (already T^2-scaled when cfg.scale_t2), shape (N,)."""
    t = cfg.temperature
    if math.isinf(t):
        both_masked = torch.isneginf(student) & torch.isneginf(teacher)
        keep = ~both_masked
        d = torch.where(keep, student - teacher, torch.zeros_like(student))
        n_keep = keep.sum(-1).to(d.dtype)
        mean = d.sum(-1) / n_keep
        dc = torch.where(keep, d - mean.unsqueeze(-1), torch.zeros_like(d))
        k = 1.0 if cfg.divergence != Divergence.JSD else cfg.beta * (1.0 - cfg.beta)
        return k * (dc * dc).sum(-1) / (2.0 * n_keep)
    if t > LARGE_T and _all_finite(student, teacher):
        d = _divergence_large_t(student, teacher, cfg)
        return d * (t * t) if cfg.scale_t2 else d
    logq = torch.log_softmax(student / t, dim=-1)
    logp = torch.log_softmax(teacher / t, dim=-1)
    if cfg.divergence == Divergence.FORWARD_KL:
        d = _kl_terms(logp, logq)
    elif cfg.divergence == Divergence.REVERSE_KL:
        d = _kl_terms(logq, logp)
    else:
        beta = cfg.beta
        # Entries where both are -inf have m = 0; keep them out of logaddexp, whose gradient
        # there would be 0 * NaN.
        live = (logp > -math.inf) | (logq > -math.inf)
        zero = torch.zeros_like(logp)
        lp, lq = torch.where(live, logp, zero), torch.where(live, logq, zero)
        logm = torch.where(
            live,
            torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta)),
            torch.full_like(logp, -math.inf),
        )
        d = beta * _kl_terms(logp, logm) + (1.0 - beta) * _kl_terms(logq, logm)
    return d * (t * t) if cfg.scale_t2 else d


def hard_ce(student: Tensor, labels: Tensor, cfg: KDConfig) -> Tensor:
    """Per-row cross-entropy at T = 1 with label smoothing; ignored rows get label 0 (masked later)."""
    logq1 = torch.log_softmax(student, dim=-1)
    v = student.shape[-1]
    bad = (labels != cfg.ignore_index) & ((labels < 0) | (labels >= v))
    safe = torch.where((labels == cfg.ignore_index) | bad, torch.zeros_like(labels), labels)
    nll = -logq1.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # Out-of-range labels (possible only in compiled graphs, which skip the eager check): NaN row.
    nll = torch.where(bad, torch.full_like(nll, math.nan), nll)
    eps = cfg.label_smoothing
    if eps == 0.0:
        return nll
    return (1.0 - eps) * nll - eps * logq1.mean(-1)


def kd_loss_reference(
    student: Tensor, teacher: Tensor, labels: Tensor | None, cfg: KDConfig
) -> Tensor:
    """Differentiable reference loss; returns the reduced loss in the math dtype (fp32/fp64)."""
    dt = _math_dtype(student)
    s = student.to(dt)
    t = teacher.to(dt)
    n, v = s.shape
    if labels is not None:
        keep = labels != cfg.ignore_index
        # Ignored rows drop out entirely: zero their inputs so NaN/inf there cannot leak in.
        s = torch.where(keep.unsqueeze(-1), s, torch.zeros_like(s))
        t = torch.where(keep.unsqueeze(-1), t, torch.zeros_like(t))
        w = keep.to(dt)
        count = keep.sum().to(dt)
    else:
        w = torch.ones(n, dtype=dt, device=s.device)
        count = torch.tensor(float(n), dtype=dt, device=s.device)
    alpha = cfg.hard_weight
    rows = torch.zeros(n, dtype=dt, device=s.device)
    if alpha < 1.0:
        rows = rows + (1.0 - alpha) * kd_divergence(s, t, cfg)
    if alpha > 0.0:
        assert labels is not None
        rows = rows + alpha * hard_ce(s, labels, cfg)
    rows = rows * w
    if cfg.reduction == Reduction.NONE:
        return rows
    total = rows.sum()
    if cfg.reduction == Reduction.SUM:
        return total
    denom = torch.clamp(count, min=1.0)
    if cfg.reduction == Reduction.MEAN:
        denom = denom * v
    return total / denom
