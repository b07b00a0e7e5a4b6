"""Reference (float64, plain torch, autograd) top-k sparse-teacher KD loss.

Written for clarity, not speed: it builds the teacher distribution implied by the k known
entries and the missing-mass rule explicitly, then computes the divergence densely with the
0 log 0 = 0 convention. It is the oracle :mod:`kdengine.llm.topk` is tested against.

Inputs (already validated by the caller): ``student`` (N, V) logits, ``indices`` (N, k) int64
distinct per row, ``logprobs`` (N, k) teacher log-probabilities at temperature T, ``labels`` (N,)
int64 or None, ``cfg`` a :class:`kdengine.llm.topk.TopKConfig`.

Per row (log p = log_softmax(student / T), t_j = exp(l_j), m = sum_j t_j, K = the k indices):

* ``renormalize``: teacher q = t / m on K, 0 elsewhere (V buckets).
* ``tail``: k + 1 buckets; teacher (t_1..t_k, 1 - m), student (p_K1..p_Kk, 1 - sum_j p_Kj).
  If k = V there is no missing token and the tail bucket is empty (teacher tail 0).
* ``uniform``: teacher q = t on K, (1 - m) / (V - k) on each of the V - k other tokens.

``1 - m`` is clamped at 0 (rounding can push m slightly above 1). D = KL(teacher || student)
(forward) or KL(student || teacher) (reverse) over those buckets; KD_r = T^2 D when scale_t2.
The hard term and the row weights are those of :mod:`kdengine.ops.kd_loss.reference`:
L_r = w_r (alpha CE_r + (1 - alpha) KD_r). Returns per-row losses (N,) in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """sum_i p_i (log p_i - log q_i) from log-probabilities, with 0 log 0 = 0 (p_i = 0 terms drop
    out in value and gradient; p_i > 0 with q_i = 0 gives +inf; NaN stays NaN). p_i = 0 means
    log p_i = -inf: a finite log p_i whose exp underflows is still p_i > 0, so against
    q_i = 0 its term is +inf, as it is in exact arithmetic."""
    p = logp.exp()
    zero = p == 0
    lp = torch.where(zero, torch.zeros_like(logp), logp)
    lq = torch.where(zero, torch.zeros_like(logq), logq)
    underflow = zero & torch.isfinite(logp) & torch.isneginf(logq)
    dropped = torch.where(underflow, torch.full_like(p, torch.inf), torch.zeros_like(p))
    return torch.where(zero, dropped, p * (lp - lq)).sum(-1)


def teacher_buckets(indices: Tensor, logprobs: Tensor, v: int, rule: str) -> Tensor:
    """Log of the teacher distribution the rule implies: (N, V), or (N, k + 1) for 'tail'."""
    n, k = indices.shape
    l = logprobs.to(torch.float64)
    m = l.exp().sum(-1, keepdim=True)
    missing = torch.clamp(1.0 - m, min=0.0)
    if rule == "renormalize":
        dense = torch.full((n, v), -torch.inf, dtype=torch.float64, device=l.device)
        return dense.scatter(-1, indices, l - m.log())
    if rule == "tail":
        if k == v:
            missing = torch.zeros_like(missing)
        return torch.cat([l, missing.log()], dim=-1)
    if rule == "uniform":
        fill = missing / (v - k) if v > k else torch.zeros_like(missing)
        dense = fill.log().expand(n, v).clone()
        return dense.scatter(-1, indices, l)
    raise ValueError(rule)


def student_buckets(student: Tensor, indices: Tensor, temperature: float, rule: str) -> Tensor:
    """Log of the student distribution over the same buckets as :func:`teacher_buckets`."""
    logp = torch.log_softmax(student.to(torch.float64) / temperature, dim=-1)
    if rule != "tail":
        return logp
    lk = logp.gather(-1, indices)
    # The rest as the log-sum of the other tokens' probabilities (no 1 - sum cancellation).
    rest = logp.scatter(-1, indices, torch.full_like(lk, -torch.inf)).logsumexp(-1, keepdim=True)
    return torch.cat([lk, rest], dim=-1)


def topk_kd_rows_reference(student: Tensor, indices: Tensor, logprobs: Tensor,
                           labels: Tensor | None, cfg) -> Tensor:
    """Per-row loss L_r (N,) in float64, differentiable w.r.t. ``student``."""
    s = student.to(torch.float64)
    n, v = s.shape
    if labels is not None:
        keep = labels != cfg.ignore_index
        s = torch.where(keep.unsqueeze(-1), s, torch.zeros_like(s))
        logprobs = torch.where(keep.unsqueeze(-1), logprobs, torch.full_like(logprobs, -1e3))
        w = keep.to(torch.float64)
    else:
        w = torch.ones(n, dtype=torch.float64, device=s.device)
    rows = torch.zeros(n, dtype=torch.float64, device=s.device)
    alpha = cfg.hard_weight
    if alpha < 1.0:
        teacher = teacher_buckets(indices, logprobs, v, cfg.missing_mass)
        stud = student_buckets(s, indices, cfg.temperature, cfg.missing_mass)
        if cfg.divergence == "forward_kl":
            d = _kl(teacher, stud)
        else:
            d = _kl(stud, teacher)
        if cfg.scale_t2:
            d = d * (cfg.temperature ** 2)
        if labels is not None:
            d = torch.where(keep, d, torch.zeros_like(d))
        rows = rows + (1.0 - alpha) * d
    if alpha > 0.0:
        assert labels is not None
        logq = torch.log_softmax(s, dim=-1)
        safe = torch.where(keep, labels, torch.zeros_like(labels))
        nll = -logq.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        eps = cfg.label_smoothing
        ce = (1.0 - eps) * nll - eps * logq.mean(-1) if eps else nll
        rows = rows + alpha * ce
    return rows * w


def reduce_rows(rows: Tensor, labels: Tensor | None, ignore_index: int, v: int,
                reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = float(rows.shape[0]) if labels is None else float((labels != ignore_index).sum())
    denom = max(count, 1.0)
    if reduction == "mean":
        denom *= v
    return total / denom


def topk_kd_loss_reference(student: Tensor, indices: Tensor, logprobs: Tensor,
                           labels: Tensor | None, cfg, reduction: str) -> Tensor:
    rows = topk_kd_rows_reference(student, indices, logprobs, labels, cfg)
    return reduce_rows(rows, labels, cfg.ignore_index, student.shape[-1], reduction)


__all__ = ["topk_kd_rows_reference", "topk_kd_loss_reference", "teacher_buckets",
           "student_buckets", "reduce_rows"]
