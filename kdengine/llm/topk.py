"""Top-k sparse-teacher distillation loss: the teacher given as (..., k) indices + log-probs.

This is what offline teacher caches store (:mod:`kdengine.llm.teacher_cache`): per token the
teacher's k most likely tokens and their log-probabilities, instead of the full V logits.

Temperature
-----------
``topk_logprobs`` are the teacher's log-probabilities **at the loss temperature T**, i.e. the
top-k entries of ``log_softmax(teacher_logits / T)`` (a cache built with
``build_teacher_cache(..., temperature=T)`` stores exactly that and records T). The student side
is ``log p = log_softmax(student_logits / T)`` over all V. Log-probs stored at another
temperature T0 can be re-tempered with :func:`retemper_topk`: ``l' = l T0 / T`` renormalised over
the k known entries. That is exact for ``missing_mass='renormalize'`` only (the missing mass at
the new temperature is not recoverable from k entries), so it returns mass-1 rows.

Missing mass (t_j = exp(l_j), m = sum_j t_j <= 1, K = the k indices, P_j = p_{K_j})
-------------------------------------------------------------------------------------
* ``'renormalize'`` (default): the teacher is q = t / m on K and 0 elsewhere.
  Forward KL: D = sum_j q_j (l_j - log m - log P_j).  Reverse KL is infinite wherever the
  student has mass off K, so ``renormalize`` + ``reverse_kl`` is a ValueError.
* ``'tail'`` (ghost bucket): k + 1 buckets, teacher (t, 1 - m), student (P, R) with
  R = sum_{i not in K} p_i (computed as that sum, not as 1 - sum P).
  Forward KL: D = sum_j t_j (l_j - log P_j) + (1 - m) (log(1 - m) - log R);
  reverse KL: D = sum_j P_j (log P_j - l_j) + R (log R - log(1 - m)).
  This equals the dense KL against the teacher that spreads its tail over the other tokens in
  proportion to the student (q_i = (1 - m) p_i / R), which is what the gradients below use.
* ``'uniform'``: the teacher is t on K and u = (1 - m) / (V - k) on each other token.
  Forward KL: D = sum_j t_j (l_j - log P_j) + (1 - m) log u - u sum_{i not in K} log p_i;
  reverse KL: D = sum_j P_j (log P_j - l_j) + sum_{i not in K} p_i log p_i - R log u.

``1 - m`` is clamped at 0 (rounding of m). When k = V there is no missing token: the tail bucket
and u are 0 whatever rounding left in 1 - m, so every rule gives the dense
:func:`kdengine.kd_loss` (with m = 1 the rules coincide). Terms with zero probability contribute
0 (0 log 0 = 0); a teacher entry of zero probability is a log-prob of ``-inf``.

Loss per row: L_r = w_r (alpha CE_r + (1 - alpha) c D_r), c = T^2 if ``scale_t2`` else 1, CE_r the
hard-label cross-entropy at T = 1 with label smoothing, w_r = 0 on ``ignore_index`` rows; the
reductions are those of :func:`kdengine.kd_loss` (``mean`` divides by count * V).

Gradient (w.r.t. a = student / T, of D): forward KL: W p - w with w the effective dense teacher
(w_K = q or t; off K: 0, (1 - m) p_i / R or u) and W = sum w; reverse KL: p_i (log p_i - log w_i - D).
The student-side gradient is dense in V (every logit moves the softmax), so the cost is one
logsumexp pass over the student plus one pass writing the gradient; the teacher side is N x k.

Implementations: float32 CPU inputs use the C++ student side (kdengine/csrc/topk_kd/topk_kd.cpp:
``topk_student_stats`` reads each row once for its max, log-sum-exp, off-top-k mass R and sum;
``topk_student_grad`` writes c1 p + c0 in one pass, the k entries then overwritten), with every
(N, k) formula in torch (:func:`_terms`); other dtypes and devices, and reverse KL + uniform
with k < V (whose off-K gradient p_i (log p_i - log u - D) is not affine in p), use torch
(``log_softmax`` + in-place ops). ``backend="torch"`` forces the torch path.

Teacher log-probs get no gradient (they are data). Double backward is not supported (a clear
RuntimeError at the ``create_graph=True`` backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kdengine.losses import OptionsLoss
from kdengine.ops.kd_loss import _check_float, check_hard_ce

__all__ = [
    "TopKConfig",
    "TopKKDLoss",
    "topk_kd_loss",
    "topk_kd_rows",
    "make_topk_config",
    "retemper_topk",
    "MISSING_MASS_RULES",
    "TOPK_DIVERGENCES",
]

MISSING_MASS_RULES = ("renormalize", "tail", "uniform")
TOPK_DIVERGENCES = ("forward_kl", "reverse_kl")
_REDUCTIONS = ("none", "sum", "batchmean", "mean")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8, torch.uint16,
               torch.uint32)


@dataclass(frozen=True)
class TopKConfig:
    """Validated settings of one top-k KD call (shared by :func:`topk_kd_rows` and the loss)."""

    temperature: float = 1.0
    scale_t2: bool = True
    divergence: str = "forward_kl"
    missing_mass: str = "renormalize"
    hard_weight: float = 0.0
    ignore_index: int = -100
    label_smoothing: float = 0.0

    @property
    def kd_coef(self) -> float:
        c = self.temperature ** 2 if self.scale_t2 else 1.0
        return c * (1.0 - self.hard_weight)


def make_topk_config(temperature: object = 1.0, *, divergence: str = "forward_kl",
                     missing_mass: str = "renormalize", scale_t2: bool = True,
                     hard_weight: object = None, has_labels: bool = False,
                     ignore_index: int = -100, label_smoothing: object = 0.0) -> TopKConfig:
    """Validate the settings (the same rules as :func:`kdengine.kd_loss`) into a TopKConfig."""
    t = _check_float("temperature", temperature)
    if not (t > 0) or math.isinf(t):
        raise ValueError(f"temperature must be a finite number > 0 for the top-k loss, got {t}")
    if not isinstance(scale_t2, bool):
        raise TypeError(f"scale_t2 must be a bool, got {type(scale_t2).__name__}")
    if divergence == "kl":
        divergence = "forward_kl"
    if divergence not in TOPK_DIVERGENCES:
        raise ValueError(
            f"divergence must be one of {list(TOPK_DIVERGENCES)} for the top-k loss, got {divergence!r}"
        )
    if missing_mass not in MISSING_MASS_RULES:
        raise ValueError(f"missing_mass must be one of {list(MISSING_MASS_RULES)}, got {missing_mass!r}")
    if divergence == "reverse_kl" and missing_mass == "renormalize":
        raise ValueError(
            "divergence='reverse_kl' with missing_mass='renormalize' is infinite: the renormalised "
            "teacher is 0 off its top-k tokens wherever the student has mass; use "
            "missing_mass='tail' or 'uniform' for reverse KL"
        )
    alpha, ignore_index, eps = check_hard_ce(hard_weight, has_labels, ignore_index, label_smoothing)
    return TopKConfig(t, scale_t2, divergence, missing_mass, alpha, ignore_index, eps)


def _topk_config(temperature: object, divergence: str, missing_mass: str, reduction: str,
                 scale_t2: bool, hard_weight: object, ignore_index: int, label_smoothing: object,
                 has_labels: bool = True, backend: Optional[str] = None) -> TopKConfig:
    """The options of the top-k entry points and modules, checked (``reduction`` and ``backend``
    stay strings: they steer the caller, not the row math)."""
    if backend not in (None, "auto", "torch", "cpu", "reference"):
        raise ValueError(
            f"backend must be None, 'auto', 'torch', 'cpu' or 'reference' for topk_kd_loss, got {backend!r}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    return make_topk_config(temperature, divergence=divergence, missing_mass=missing_mass,
                            scale_t2=scale_t2, hard_weight=hard_weight, has_labels=has_labels,
                            ignore_index=ignore_index, label_smoothing=label_smoothing)


def retemper_topk(logprobs: Tensor, from_temperature: float, to_temperature: float) -> Tensor:
    """Top-k log-probs at ``from_temperature`` -> at ``to_temperature``, renormalised over the k
    entries (l' = l T0/T - logsumexp(l T0/T)). Exact for ``missing_mass='renormalize'`` only."""
    f, t = float(from_temperature), float(to_temperature)
    if not (f > 0 and t > 0) or math.isinf(f) or math.isinf(t):
        raise ValueError(f"temperatures must be finite and > 0, got {f} and {t}")
    x = logprobs.float() * (f / t) if logprobs.dtype != torch.float64 else logprobs * (f / t)
    return (x - torch.logsumexp(x, dim=-1, keepdim=True)).to(logprobs.dtype)


# --------------------------------------------------------------------------- the math


def _logprob_tol(dtype: torch.dtype) -> float:
    """How far above 0 a log-prob may round."""
    return {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 1e-3)


def _mass_tol(dtype: torch.dtype) -> float:
    """How far above 1 the k probabilities may sum. Loose except for float64: cache values are
    bf16 (~2^-9 relative error each) and often reach the loss widened to float32."""
    return 1e-6 if dtype == torch.float64 else 2e-2


def _nz(w: Tensor, x: Tensor) -> Tensor:
    """x where the weight w is not 0, else 0 (0 log 0 = 0); NaN weights keep x, so NaN propagates."""
    return torch.where(w == 0, torch.zeros_like(x), x)


def _reverse_terms(P: Tensor, logP: Tensor, l: Tensor) -> Tensor:
    """P (logP - l) per listed entry: the student's probability P of finite logits is never 0, even
    where exp(logP) underflows, so a zero-probability teacher entry (l = -inf) makes the term
    +inf at any dtype; only a student log-prob of -inf (P exactly 0) gives 0 (0 log 0 = 0)."""
    underflow = (P == 0) & torch.isfinite(logP) & torch.isneginf(l)
    return torch.where(underflow, torch.full_like(P, torch.inf), _nz(P, P * (logP - l)))


def _native_ok(student: Tensor, use_native: Optional[bool]) -> bool:
    """The C++ student side (kdengine/csrc/topk_kd/topk_kd.cpp) serves float32 CPU rows."""
    if use_native is False or student.dtype != torch.float32 or student.device.type != "cpu":
        return False
    from kdengine import _native

    ok = _native.has_op("cpu", "topk_student_stats")
    if use_native and not ok:
        raise RuntimeError(
            "backend='cpu' for topk_kd_loss needs the native CPU extension: "
            f"{_native.status('cpu').reason}"
        )
    return ok


def _off_k_mass_positive(student: Tensor, indices: Tensor, R: Tensor, missing: Tensor) -> Optional[Tensor]:
    """Whether the student's mass off K is > 0 in exact arithmetic, (n, 1) bool, where that matters:
    against a teacher tail of exactly 0 a positive student tail makes reverse KL +inf, and R (a sum
    of exps) may have underflowed to 0. None when no row has both R == 0 and a zero teacher tail."""
    if not bool(((R == 0) & (missing == 0)).any()):
        return None
    off_k = student.scatter(-1, indices, -torch.inf)
    return (R > 0) | (off_k.amax(-1, keepdim=True) > -torch.inf)


def _terms(logP: Tensor, l: Tensor, t: Tensor, m: Tensor, missing: Tensor, R: Optional[Tensor],
           sum_off_logp: Optional[Tensor], v: int, k: int, full: bool, cfg: TopKConfig,
           R_pos: Optional[Tensor] = None):
    """The divergence per row and its gradient w.r.t. a = student / T in the form
    off K: c1 p_i + c0 (per-row c1, c0 of shape (n, 1)); on K: kv (n, k).
    (Reverse KL + uniform with k < V is not of that form: handled by _rows_torch.)
    R_pos (reverse KL + tail): whether the student's mass off K is > 0 in exact arithmetic (R
    itself may have underflowed); against a teacher tail of exactly 0 that makes the row +inf."""
    P = logP.exp()
    zero = torch.zeros_like(m)
    if cfg.divergence == "forward_kl":
        if cfg.missing_mass == "renormalize":
            q = t / m
            d = _nz(q, q * (l - m.log() - logP)).sum(-1)
            return d, torch.ones_like(m), zero, P - q
        d = _nz(t, t * (l - logP)).sum(-1)
        W = m + missing
        if cfg.missing_mass == "tail":
            d = d + _nz(missing, missing * (missing.log() - R.log())).squeeze(-1)
            return d, W - _nz(missing, missing / R), zero, P * W - t
        u = missing / (v - k) if not full else zero
        if not full:
            d = d + _nz(u, missing * u.log() - u * sum_off_logp).squeeze(-1)
        return d, W, -u, P * W - t
    d = _reverse_terms(P, logP, l).sum(-1)
    if cfg.missing_mass == "tail":
        gtail = _nz(R, R.log() - missing.log())
        d = d + _nz(R, R * gtail).squeeze(-1)
        if R_pos is not None:
            d = torch.where((R_pos & (missing == 0)).squeeze(-1), torch.full_like(d, torch.inf), d)
        D = d.unsqueeze(-1)
        return d, gtail - D, zero, _nz(P, P * (logP - l - D))
    assert full  # reverse + uniform with k = V: nothing off K
    D = d.unsqueeze(-1)
    return d, zero, zero, _nz(P, P * (logP - l - D))


def _rows_native(student, indices, l, t, m, missing, cfg, full, need_grad, scale):
    from kdengine import _native

    ops = _native.ops("cpu")
    n, v = student.shape
    k = indices.shape[-1]
    inv_t = 1.0 / cfg.temperature
    x = student.contiguous()
    need_rest = not full and (cfg.missing_mass != "renormalize" or cfg.divergence != "forward_kl")
    rowmax, logsum, logrest, sumx = ops.topk_student_stats(x, indices, inv_t, need_rest)
    xk = x.gather(-1, indices).double()
    rm = rowmax.double().unsqueeze(-1)
    ls = logsum.unsqueeze(-1)
    logP = ((xk - rm) * inv_t - ls).float()
    R = None
    if need_rest:
        R = logrest.exp().float().unsqueeze(-1)
    elif full:
        R = torch.zeros_like(m)
    sum_off_logp = None
    if cfg.missing_mass == "uniform" and not full:
        lse = rm * inv_t + ls
        sum_off_logp = ((sumx.unsqueeze(-1) - xk.sum(-1, keepdim=True)) * inv_t - (v - k) * lse).float()
    R_pos = None
    if cfg.divergence == "reverse_kl" and cfg.missing_mass == "tail" and not full:
        R_pos = _off_k_mass_positive(x, indices, R, missing)
    d, c1, c0, kv = _terms(logP, l, t, m, missing, R, sum_off_logp, v, k, full, cfg, R_pos)
    grad = None
    if need_grad:
        c1 = (c1 * scale).float().expand(n, 1).reshape(n).contiguous()
        c0 = (c0 * scale).float().expand(n, 1).reshape(n).contiguous()
        grad = ops.topk_student_grad(x, rowmax, logsum, c1, c0, inv_t)
        grad.scatter_(-1, indices, (kv * scale).float())
    return d, grad


def _rows_torch(student, indices, l, t, m, missing, cfg, full, need_grad, scale, dt):
    n, v = student.shape
    k = indices.shape[-1]
    rule = cfg.missing_mass
    forward = cfg.divergence == "forward_kl"
    a = student.to(dt) if cfg.temperature == 1.0 else student.to(dt) / cfg.temperature
    # log_softmax is one fused pass in torch (logsumexp is four); the gradient reuses it.
    logp = torch.log_softmax(a, dim=-1)
    del a
    logP = logp.gather(-1, indices)  # (n, k)
    sum_off_logp = None
    if rule == "uniform" and forward and not full:
        # before logp is exponentiated in place; float64: the terms (|log p| ~ |logits| / T)
        # are large and get subtracted
        sum_off_logp = (logp.sum(-1, keepdim=True, dtype=torch.float64)
                        - logP.sum(-1, keepdim=True, dtype=torch.float64)).to(dt)
    # R = mass of the student off K, as the sum of those probabilities (no cancellation).
    p = R = None
    if need_grad or rule == "tail" or (rule == "uniform" and not forward):
        # reverse uniform needs log p next to p; everything else exponentiates in place
        p = logp.exp() if (rule == "uniform" and not forward) else logp.exp_()
        if full:
            R = torch.zeros_like(m)
        elif rule != "renormalize" or not forward:
            p.scatter_(-1, indices, 0.0)  # p now holds p_i off K, 0 on K
            R = p.sum(-1, keepdim=True)
    if rule == "uniform" and not forward and not full:
        P = logP.exp()
        logu = (missing / (v - k)).log()
        d = _reverse_terms(P, logP, l).sum(-1)
        plogp = _nz(p, p * logp).sum(-1, keepdim=True)
        d = d + (plogp - _nz(R, R * logu)).squeeze(-1)
        R_pos = _off_k_mass_positive(student, indices, R, missing)
        if R_pos is not None:  # a zero teacher tail (log u = -inf) against student mass off K
            d = torch.where((R_pos & (missing == 0)).squeeze(-1), torch.full_like(d, torch.inf), d)
        if not need_grad:
            return d, None
        D = d.unsqueeze(-1)
        gd = _nz(p, p * (logp - logu - D))
        gd.scatter_(-1, indices, _nz(P, P * (logP - l - D)))
        return d, gd.mul_(scale)
    R_pos = None
    if not forward and rule == "tail" and not full:
        R_pos = _off_k_mass_positive(student, indices, R, missing)
    d, c1, c0, kv = _terms(logP, l, t, m, missing, R, sum_off_logp, v, k, full, cfg, R_pos)
    if not need_grad:
        return d, None
    gd = p.mul_(c1 * scale)
    if rule == "uniform":
        gd.add_(c0 * scale)
    gd.scatter_(-1, indices, kv * scale)
    return d, gd


def _rows(student: Tensor, indices: Tensor, logprobs: Tensor, cfg: TopKConfig,
          labels: Optional[Tensor], need_grad: bool,
          use_native: Optional[bool] = None, grad_scale: float = 1.0) -> tuple[Tensor, Optional[Tensor]]:
    """Per-row losses (n,) in the math dtype and the gradient of their sum (n, V) in the math
    dtype (or None). student (n, V), indices (n, k) int64, logprobs (n, k), labels (n,) or None."""
    dt = torch.float64 if student.dtype == torch.float64 else torch.float32
    n, v = student.shape
    k = indices.shape[-1]
    full = k == v  # distinct indices: every token is known, nothing is missing
    temp = cfg.temperature
    alpha = cfg.hard_weight
    coef = cfg.kd_coef

    keep = None
    if labels is not None:
        keep = labels != cfg.ignore_index
        if not bool(keep.all()):
            # Ignored rows drop out: zero inputs so NaN/inf there cannot leak in.
            student = torch.where(keep.unsqueeze(-1), student, torch.zeros((), dtype=student.dtype))
            logprobs = torch.where(keep.unsqueeze(-1), logprobs, torch.zeros((), dtype=logprobs.dtype))
        else:
            keep = None

    rows = torch.zeros(n, dtype=dt, device=student.device)
    grad: Optional[Tensor] = None

    if alpha < 1.0:
        rule = cfg.missing_mass
        forward = cfg.divergence == "forward_kl"
        l = logprobs.to(dt)
        t = l.exp()
        # 1 - m cancels when the top-k holds almost all the mass: sum in float64 (N x k, cheap)
        m64 = logprobs.to(torch.float64).exp().sum(-1, keepdim=True)
        m = m64.to(dt)
        missing = torch.zeros_like(m) if full else torch.clamp(1.0 - m64, min=0.0).to(dt)
        scale = coef / temp * grad_scale  # d(c D)/d student = c/T dD/da
        dense_rev_uniform = rule == "uniform" and not forward and not full
        if not dense_rev_uniform and _native_ok(student, use_native):
            # C++ student side: one read for the statistics, one read + write for the gradient.
            d, grad = _rows_native(student, indices, l, t, m, missing, cfg, full, need_grad, scale)
        else:
            d, grad = _rows_torch(student, indices, l, t, m, missing, cfg, full, need_grad, scale, dt)
        rows = rows + coef * d

    if alpha > 0.0:
        assert labels is not None
        logq1 = torch.log_softmax(student.to(dt), dim=-1)
        safe = torch.where(labels == cfg.ignore_index, torch.zeros_like(labels), labels).unsqueeze(-1)
        nll = -logq1.gather(-1, safe).squeeze(-1)
        eps = cfg.label_smoothing
        ce = nll
        if eps:
            mean_logq = logq1.sum(-1, dtype=torch.float64).div_(v).to(dt)
            ce = (1.0 - eps) * nll - eps * mean_logq
        rows = rows + alpha * ce
        if need_grad:
            g1 = logq1.exp_()
            if eps:
                g1.sub_(eps / v)
            g1.scatter_add_(-1, safe, torch.full_like(nll, -(1.0 - eps)).unsqueeze(-1))
            grad = g1.mul_(alpha * grad_scale) if grad is None else grad.add_(g1, alpha=alpha * grad_scale)

    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        if grad is not None:
            grad = torch.where(keep.unsqueeze(-1), grad, torch.zeros((), dtype=dt))
    if need_grad and grad is None:
        grad = torch.zeros(n, v, dtype=dt)
    return rows, grad


def topk_kd_rows(student: Tensor, indices: Tensor, logprobs: Tensor, cfg: TopKConfig,
                 labels: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One chunk of rows, for fused-linear paths: no validation, no autograd.

    Args:
        student: (n, V) contiguous logits (any float dtype).
        indices: (n, k) int64, distinct per row, in [0, V).
        logprobs: (n, k) float32 teacher log-probs at ``cfg.temperature``.
        cfg: a :class:`TopKConfig` (from :func:`make_topk_config`).
        labels: (n,) int64 or None (needed when ``cfg.hard_weight > 0``; rows equal to
            ``cfg.ignore_index`` get loss 0 and gradient 0).

    Returns:
        (per-row loss (n,) float32, gradient of the SUM of the row losses w.r.t. ``student``
        (n, V) in ``student``'s dtype). float64 students give a float64 loss.
    """
    rows, grad = _rows(student, indices, logprobs, cfg, labels, need_grad=True)
    assert grad is not None
    loss_dt = torch.float64 if student.dtype == torch.float64 else torch.float32
    return rows.to(loss_dt), grad.to(student.dtype)


# --------------------------------------------------------------------------- validation


def _validate(student: object, indices: object, logprobs: object, labels: object,
              ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    if not isinstance(student, Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student).__name__}")
    if student.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"student_logits must be a floating tensor, got dtype {student.dtype}")
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(
            f"student_logits must have shape (..., V) with V >= 1, got {tuple(student.shape)}"
        )
    if not isinstance(indices, Tensor):
        raise TypeError(f"topk_indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in _INT_DTYPES:
        raise TypeError(f"topk_indices must be an integer tensor, got dtype {indices.dtype}")
    if not isinstance(logprobs, Tensor):
        raise TypeError(f"topk_logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    if logprobs.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"topk_logprobs must be a floating tensor, got dtype {logprobs.dtype}")
    v = student.shape[-1]
    lead = tuple(student.shape[:-1])
    if indices.dim() != student.dim() or tuple(indices.shape[:-1]) != lead:
        raise ValueError(
            f"topk_indices must have shape {lead + ('k',)} (student_logits' leading dims + k), "
            f"got {tuple(indices.shape)}"
        )
    if tuple(logprobs.shape) != tuple(indices.shape):
        raise ValueError(
            f"topk_logprobs must have the shape of topk_indices {tuple(indices.shape)}, "
            f"got {tuple(logprobs.shape)}"
        )
    k = indices.shape[-1]
    if k == 0 or k > v:
        raise ValueError(f"topk_indices must have 1 <= k <= V = {v} entries per row, got k = {k}")
    for name, x in (("topk_indices", indices), ("topk_logprobs", logprobs)):
        if x.device != student.device:
            raise ValueError(f"{name} is on {x.device} but student_logits on {student.device}")
    idx = indices.to(torch.int64)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= v:
            bad = lo if lo < 0 else hi
            raise ValueError(f"topk_indices must be in [0, {v}) (V of student_logits); found {bad}")
        if k > 1:
            srt = idx.sort(dim=-1).values
            if bool((srt[..., 1:] == srt[..., :-1]).any()):
                raise ValueError("topk_indices has a repeated index within a row; top-k indices must be distinct")
        lp = logprobs.detach()
        if bool((lp > _logprob_tol(logprobs.dtype)).any()):
            raise ValueError(
                f"topk_logprobs must be log-probabilities (<= 0); found {float(lp.max())}"
            )
        mass = lp.to(torch.float64).exp().sum(-1)
        if bool((mass > 1.0 + _mass_tol(logprobs.dtype)).any()):
            raise ValueError(
                f"topk_logprobs: the k probabilities of a row sum to {float(mass.max())} > 1; "
                "they must be the teacher's log-probabilities of k distinct tokens"
            )
    lab = None
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype not in _INT_DTYPES:
            raise TypeError("labels must be an integer torch.Tensor of class indices")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels must have shape {lead}, got {tuple(labels.shape)}")
        lab = labels.to(torch.int64)
        bad = (lab != ignore_index) & ((lab < 0) | (lab >= v))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be in [0, {v}) or equal ignore_index={ignore_index}; found {int(lab[bad][0])}"
            )
    return student, idx, logprobs, lab


def _check_zero_mass(logprobs: Tensor, labels: Optional[Tensor], cfg: TopKConfig) -> None:
    if cfg.missing_mass != "renormalize" or cfg.hard_weight >= 1.0 or logprobs.numel() == 0:
        return
    zero = torch.isneginf(logprobs).all(-1)
    if labels is not None:
        zero = zero & (labels != cfg.ignore_index)
    if bool(zero.any()):
        raise ValueError(
            "topk_logprobs: a row has all its log-probs at -inf (known mass 0), which "
            "missing_mass='renormalize' cannot renormalise; use 'tail' or 'uniform'"
        )


# --------------------------------------------------------------------------- autograd


class _TopKKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, indices, logprobs, labels, cfg, reduction, use_native):
        need = bool(ctx.needs_input_grad[0])
        n, v = student.shape
        if labels is not None:
            count = float((labels != cfg.ignore_index).sum())
        else:
            count = float(n)
        scale = 1.0
        if reduction in ("batchmean", "mean"):
            scale = 1.0 / (max(count, 1.0) * (v if reduction == "mean" else 1))
        # the reduction's scale is folded into the gradient's coefficients (no extra N x V pass)
        rows, grad = _rows(student, indices, logprobs, cfg, labels, need_grad=need,
                           use_native=use_native, grad_scale=scale)
        out = rows if reduction == "none" else rows.sum() * scale
        if need:
            ctx.save_for_backward(grad.to(student.dtype) if grad.dtype != student.dtype else grad)
        ctx.reduction = reduction
        return out

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "topk_kd_loss does not support double backward (create_graph=True): its backward "
                "is a saved analytic gradient, which cannot be differentiated again"
            )
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            gs = grad * g.to(grad.dtype).unsqueeze(-1)
        elif float(g) == 1.0:
            gs = grad
        else:
            gs = grad * g.to(grad.dtype)
        return gs, None, None, None, None, None, None


def topk_kd_loss(
    student_logits: Tensor,
    topk_indices: Tensor,
    topk_logprobs: Tensor,
    temperature: float = 1.0,
    *,
    divergence: str = "forward_kl",
    missing_mass: str = "renormalize",
    reduction: str = "batchmean",
    scale_t2: bool = True,
    labels: Optional[Tensor] = None,
    hard_weight: Optional[float] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    backend: Optional[str] = None,
) -> Tensor:
    """KD loss against a top-k sparse teacher (see the module docstring for the formulas).

    Args:
        student_logits: ``(..., V)`` raw student logits.
        topk_indices: ``(..., k)`` integer token ids of the teacher's top-k, distinct per row,
            in ``[0, V)``; 1 <= k <= V.
        topk_logprobs: ``(..., k)`` the teacher's log-probabilities of those tokens at
            ``temperature`` (``-inf`` for zero probability); their probabilities sum to <= 1.
        temperature: T > 0 (finite).
        divergence: ``"forward_kl"`` (KL(teacher || student)) or ``"reverse_kl"``.
        missing_mass: ``"renormalize"``, ``"tail"`` or ``"uniform"``.
        reduction, scale_t2, labels, hard_weight, ignore_index, label_smoothing: as in
            :func:`kdengine.kd_loss`.
        backend: None / ``"auto"`` (the C++ student side for float32 CPU inputs when the
            native extension is available, else torch), ``"torch"`` (vectorised torch, analytic
            gradient), ``"cpu"`` (the C++ student side; float32 CPU, and every rule but
            reverse KL + uniform with k < V, which stays in torch) or ``"reference"`` (the
            float64 autograd oracle, slow).

    Returns:
        The loss in the student's dtype (float32/float64 math inside).
    """
    cfg = _topk_config(temperature, divergence, missing_mass, reduction, scale_t2, hard_weight,
                       ignore_index, label_smoothing, labels is not None, backend)
    s, idx, lp, lab = _validate(student_logits, topk_indices, topk_logprobs, labels, cfg.ignore_index)
    lead = s.shape[:-1]
    v, k = s.shape[-1], idx.shape[-1]
    s2 = s.reshape(-1, v).contiguous()
    idx2 = idx.reshape(-1, k).contiguous()
    lp2 = lp.detach().reshape(-1, k).contiguous()
    lab2 = lab.reshape(-1).contiguous() if lab is not None else None
    _check_zero_mass(lp2, lab2, cfg)
    if backend == "reference":
        from kdengine.llm.reference_topk import topk_kd_loss_reference

        loss = topk_kd_loss_reference(s2, idx2, lp2, lab2, cfg, reduction)
    else:
        use_native = {"torch": False, "cpu": True}.get(backend)
        loss = _TopKKD.apply(s2, idx2, lp2, lab2, cfg, reduction, use_native)
    if reduction == "none":
        loss = loss.reshape(lead)
    return loss.to(s.dtype)


class TopKKDLoss(OptionsLoss):
    """Module form of :func:`topk_kd_loss`: ``loss(student_logits, topk_indices, topk_logprobs,
    labels=None)``."""

    def __init__(self, temperature: float = 1.0, *, divergence: str = "forward_kl",
                 missing_mass: str = "renormalize", reduction: str = "batchmean",
                 scale_t2: bool = True, hard_weight: Optional[float] = None,
                 ignore_index: int = -100, label_smoothing: float = 0.0,
                 backend: Optional[str] = None) -> None:
        super().__init__(locals())
        _topk_config(**self.kwargs)

    def forward(self, student_logits: Tensor, topk_indices: Tensor, topk_logprobs: Tensor,
                labels: Optional[Tensor] = None) -> Tensor:
        return topk_kd_loss(student_logits, topk_indices, topk_logprobs, labels=labels, **self.kwargs)
