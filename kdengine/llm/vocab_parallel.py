"""Vocabulary-parallel KD loss on ``torch.distributed``: logits sharded over the vocabulary.

Each rank of a process group holds a contiguous slice ``[vocab_start, vocab_start + V_local)`` of
the student and teacher logits (shards may be uneven, down to one column). The loss and the
gradients equal those of the single-process :func:`kdengine.kd_loss` on the concatenated logits
(same semantics: :mod:`kdengine.reference.kd_loss`), and every rank returns the same loss.

Forward, per row, with three all-reduces of small ``(N, k)`` row tensors (never of ``N x V``):

1. ``all_reduce(MAX)`` of the row maxima of ``s/T``, ``t/T`` (and ``s`` for the T = 1 CE term);
2. ``all_reduce(SUM)`` of the shifted sums of exponentials -> the global log-partition functions;
3. ``all_reduce(SUM)`` of the per-row partial divergence sums (KL, or the two KL(. || m) of the
   JSD), of the label logit (the standard vocab-parallel cross-entropy trick: only the rank whose
   slice holds the label contributes its logit, the others add 0) and, with label smoothing, of
   the row sum of the logits.

Backward is local: the gradient of a shard only needs the global row statistics saved from the
forward (log-partition functions and divergences), so it does no communication.

Before any of that, one ``all_gather`` of a small descriptor (shard size, leading shape, dtype,
options, a checksum of the labels) checks that the ranks agree. A mismatch raises a
``ValueError`` naming the argument on *every* rank (no rank is left waiting in a collective).
Wrong argument *types* raise a ``TypeError`` locally, before any collective.

Numerics: bf16/fp16/fp32 inputs are computed in float32 and float64 inputs in float64; gradients
come back in the input dtype. Log-probabilities are formed as ``(x - max) - log Z`` from the global
row statistics, so their rounding error scales with ``|log p|``, not with the size of the logits.
The divergence is a sum of terms that cancel when the two distributions are close, which is the
case at large T (terms O(1/T), divergence O(1/T^2): float32 would lose about ``1e-7 * T``
relative accuracy) and late in distillation. Hence:

* for ``T > FP64_ABOVE_T`` (8) the row terms are formed in float64 directly;
* otherwise the float32 forward also all-reduces a rounding-error bound (eps32 x the size of the
  log-probability terms, per row) and, when it exceeds ``5e-5`` of the divergence (of the reduced
  loss; of any row for ``reduction="none"``), the forward is redone in float64 -- on every rank
  alike, since the bound is all-reduced. Observed float32 errors stay below ~5e-6 relative.

The result is within 1e-5 relative of a float64 evaluation for any finite T up to 1e3 (tested;
the float64 error grows like ``1e-16 * T``, so the bound holds far beyond). ``T = inf`` is not
supported here (a ValueError; use :func:`kdengine.kd_loss` on gathered logits for the limit).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from kdengine.ops.kd_loss.config import Divergence, KDConfig, Reduction
from kdengine.ops.kd_loss import _check_logits, make_config

__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_linear_kd_loss", "FP64_ABOVE_T"]

FP64_ABOVE_T = 8.0
# a float32 forward whose rounding-error bound (eps32 x the size of the log-probability terms,
# pessimistic: actual errors are 10-100x smaller) exceeds this fraction of the divergence is redone
# in float64
_COND_RTOL = 5e-5
_DTYPE_CODE = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.float64: 4}


# --------------------------------------------------------------------------- collectives


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(x: Tensor, op, group, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _all_gather(x: Tensor, group, world: int) -> Tensor:
    if world == 1:
        return x.unsqueeze(0)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x, group=group)
    return torch.stack(out)


# --------------------------------------------------------------------------- validation

# Descriptor slots: (field, argument named in the error, human description).
_FIELDS = (
    ("error", "student_shard", "local shape check"),
    ("v_local", "student_shard", "vocabulary shard size"),
    ("lead_ndim", "student_shard", "number of leading dims"),
    ("lead_hash", "student_shard", "leading shape"),
    ("dtype", "student_shard", "dtype"),
    ("vocab_start_given", "vocab_start", "vocab_start given or None"),
    ("vocab_start", "vocab_start", "vocab_start"),
    ("temperature", "temperature", "temperature"),
    ("reduction", "reduction", "reduction"),
    ("divergence", "divergence", "divergence"),
    ("beta", "beta", "beta"),
    ("hard_weight", "hard_weight", "hard_weight"),
    ("ignore_index", "ignore_index", "ignore_index"),
    ("label_smoothing", "label_smoothing", "label_smoothing"),
    ("scale_t2", "scale_t2", "scale_t2"),
    ("has_labels", "labels", "labels given or None"),
    ("labels_sum", "labels", "labels (checksum)"),
    ("labels_wsum", "labels", "labels (checksum)"),
)
_IDX = {f: i for i, (f, _, _) in enumerate(_FIELDS)}
# Fields that legitimately differ between ranks.
_PER_RANK = {"error", "v_local", "vocab_start"}
# Local errors, by code: (argument, message).
_LOCAL_ERRORS = {
    1: ("teacher_shard", "teacher_shard must have the same shape as student_shard"),
    2: ("student_shard", "student_shard has an empty vocabulary shard (V_local = 0)"),
    3: ("labels", "labels must have the shape of the logits' leading dims"),
    4: ("teacher_shard", "teacher_shard must be on the same device as student_shard"),
    5: ("vocab_start", "vocab_start must be >= 0"),
}


def _check_tensor(name: str, x: object) -> Tensor:
    if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] == 0:
        return x  # an empty shard is a group error (code 2): every rank must raise, not this one alone
    return _check_logits(name, x)


def _shape_hash(shape: Sequence[int]) -> float:
    h = 0
    for d in shape:
        h = (h * 1_000_003 + int(d) + 1) % (1 << 50)
    return float(h)


def _describe(s: Tensor, t: Tensor, labels: Optional[Tensor], cfg: KDConfig,
              vocab_start: Optional[int]) -> tuple[Tensor, int]:
    err = 0
    if tuple(t.shape) != tuple(s.shape):
        err = 1
    elif s.shape[-1] == 0:
        err = 2
    elif labels is not None and tuple(labels.shape) != tuple(s.shape[:-1]):
        err = 3
    elif t.device != s.device:
        err = 4
    elif vocab_start is not None and vocab_start < 0:
        err = 5
    d = [0.0] * len(_FIELDS)
    d[_IDX["error"]] = float(err)
    d[_IDX["v_local"]] = float(s.shape[-1])
    d[_IDX["lead_ndim"]] = float(s.dim() - 1)
    d[_IDX["lead_hash"]] = _shape_hash(s.shape[:-1])
    d[_IDX["dtype"]] = float(_DTYPE_CODE[s.dtype])
    d[_IDX["vocab_start_given"]] = float(vocab_start is not None)
    d[_IDX["vocab_start"]] = float(vocab_start if vocab_start is not None else -1)
    d[_IDX["temperature"]] = cfg.temperature
    d[_IDX["reduction"]] = float(int(cfg.reduction))
    d[_IDX["divergence"]] = float(int(cfg.divergence))
    d[_IDX["beta"]] = cfg.beta
    d[_IDX["hard_weight"]] = cfg.hard_weight
    d[_IDX["ignore_index"]] = float(cfg.ignore_index)
    d[_IDX["label_smoothing"]] = cfg.label_smoothing
    d[_IDX["scale_t2"]] = float(cfg.scale_t2)
    d[_IDX["has_labels"]] = float(labels is not None)
    if labels is not None and err == 0 and labels.numel() > 0:
        lab = labels.detach().reshape(-1).to(torch.float64)
        wts = (torch.arange(lab.numel(), device=lab.device, dtype=torch.float64) % 1009) + 1
        d[_IDX["labels_sum"]] = float(lab.sum())
        d[_IDX["labels_wsum"]] = float((lab * wts).sum())
    return torch.tensor(d, dtype=torch.float64, device=s.device), err


def _fmt(field: str, v: float):
    if field in ("temperature", "beta", "hard_weight", "label_smoothing"):
        return v
    if field == "dtype":
        return {c: str(k) for k, c in _DTYPE_CODE.items()}.get(int(v), v)
    if field == "reduction":
        return Reduction(int(v)).name.lower()
    if field == "divergence":
        return Divergence(int(v)).name.lower()
    if field in ("scale_t2", "has_labels", "vocab_start_given"):
        return bool(v)
    return int(v)


def _check_group(desc: Tensor, rank: int) -> tuple[list[int], list[int]]:
    """Raise the same ValueError on every rank for any disagreement; return (sizes, starts)."""
    world = desc.shape[0]
    errs = desc[:, _IDX["error"]].tolist()
    for r, e in enumerate(errs):
        if e != 0:
            arg, msg = _LOCAL_ERRORS[int(e)]
            where = "this rank" if r == rank else f"rank {r}"
            raise ValueError(f"{arg}: {msg} (on {where} of the process group)")
    for f, arg, what in _FIELDS:
        if f in _PER_RANK:
            continue
        col = desc[:, _IDX[f]]
        bad = (col != col[0]).nonzero().flatten().tolist()
        if bad:
            r = bad[0]
            if f == "lead_hash" or f == "lead_ndim":
                detail = "the leading (batch/sequence) shape differs"
            else:
                detail = f"rank 0 has {_fmt(f, float(col[0]))}, rank {r} has {_fmt(f, float(col[r]))}"
            raise ValueError(
                f"{arg}: mismatched shards across the process group: {what} must agree on all "
                f"{world} ranks ({detail})"
            )
    sizes = [int(v) for v in desc[:, _IDX["v_local"]].tolist()]
    if desc[0, _IDX["vocab_start_given"]] == 0:
        starts = [sum(sizes[:r]) for r in range(world)]
    else:
        starts = [int(v) for v in desc[:, _IDX["vocab_start"]].tolist()]
        order = sorted(range(world), key=lambda r: starts[r])
        pos = 0
        for r in order:
            if starts[r] != pos:
                raise ValueError(
                    f"vocab_start: the shards must tile the vocabulary [0, {sum(sizes)}) without gap "
                    f"or overlap; rank {r} starts at {starts[r]} where {pos} was expected "
                    f"(starts {starts}, sizes {sizes})"
                )
            pos += sizes[r]
    return sizes, starts


# --------------------------------------------------------------------------- math


def _kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """Row sums of p (log p - log q) with 0 log 0 = 0."""
    p = logp.exp()
    pos = p > 0
    return torch.where(pos, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _log_softmax(x: Tensor, st: Tensor) -> Tensor:
    """log softmax of a shard from the global row (max, log-sum-exp-shifted) pair ``st`` (N, 2)."""
    return (x - st[:, 0:1]) - st[:, 1:2]


def _log_mix(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    live = (logp > -math.inf) | (logq > -math.inf)
    zero = torch.zeros_like(logp)
    lp, lq = torch.where(live, logp, zero), torch.where(live, logq, zero)
    return torch.where(live, torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta)),
                       torch.full_like(logp, -math.inf))


def _prepare(s_in: Tensor, t_in: Tensor, labels: Optional[Tensor], cfg: KDConfig, dt: torch.dtype):
    v = s_in.shape[-1]
    s = s_in.detach().reshape(-1, v).to(dt)
    t = t_in.detach().reshape(-1, v).to(dt)
    if labels is not None:
        keep = labels != cfg.ignore_index
        s = torch.where(keep.unsqueeze(-1), s, torch.zeros_like(s))
        t = torch.where(keep.unsqueeze(-1), t, torch.zeros_like(t))
        w = keep.to(dt)
    else:
        w = torch.ones(s.shape[0], dtype=dt, device=s.device)
    return s, t, w


def _forward(s_in, t_in, labels, cfg: KDConfig, start: int, v_global: int, group, world: int,
             dt: torch.dtype):
    """The forward in math dtype ``dt``: (loss, row statistics to save, ill_conditioned).

    In float32, ``ill_conditioned`` says that for some row the estimated rounding error of the
    divergence exceeds ``_COND_RTOL`` of its value (close distributions: the per-entry terms
    cancel). It is computed from all-reduced values, so every rank sees the same flag."""
    s, t, w = _prepare(s_in, t_in, labels, cfg, dt)
    n, vl = s.shape
    temp = cfg.temperature
    alpha = cfg.hard_weight
    need_kd, need_ce = alpha < 1.0, alpha > 0.0
    a = s / temp if temp != 1.0 else s
    b = t / temp if temp != 1.0 else t
    sep_ce = need_ce and (temp != 1.0 or not need_kd)

    # 1. global row maxima
    cols = []
    if need_kd:
        cols += [a.amax(-1), b.amax(-1)]
    if sep_ce:
        cols.append(s.amax(-1))
    m = _all_reduce(torch.stack(cols, -1), dist.ReduceOp.MAX, group, world)
    # a row that is -inf everywhere has no finite max: shift by 0 there (its loss is NaN anyway)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # 2. global sums of exponentials
    sums, k = [], 0
    if need_kd:
        sums += [(a - m[:, 0:1]).exp().sum(-1), (b - m[:, 1:2]).exp().sum(-1)]
        k = 2
    if sep_ce:
        sums.append((s - m[:, k:k + 1]).exp().sum(-1))
    z = _all_reduce(torch.stack(sums, -1), dist.ReduceOp.SUM, group, world)
    logz = z.log()
    # (max, log-sum) pairs: log-probabilities are formed as (x - max) - logz, whose rounding error
    # scales with |log p| and not with the size of the logits themselves
    st_a = torch.stack([m[:, 0], logz[:, 0]], -1) if need_kd else None
    st_b = torch.stack([m[:, 1], logz[:, 1]], -1) if need_kd else None
    lse1 = None
    if need_ce:
        lse1 = m[:, k] + logz[:, k] if sep_ce else m[:, 0] + logz[:, 0]

    # 3. partial row sums
    parts = []
    if need_kd:
        logq = _log_softmax(a, st_a)
        logp = _log_softmax(b, st_b)
        if cfg.divergence == Divergence.FORWARD_KL:
            parts.append(_kl_terms(logp, logq))
        elif cfg.divergence == Divergence.REVERSE_KL:
            parts.append(_kl_terms(logq, logp))
        else:
            logm = _log_mix(logp, logq, cfg.beta)
            parts += [_kl_terms(logp, logm), _kl_terms(logq, logm)]
    in_shard = idx = None
    if need_ce:
        lab = labels
        in_shard = (lab >= start) & (lab < start + vl) & (lab != cfg.ignore_index)
        idx = torch.where(in_shard, lab - start, torch.zeros_like(lab))
        sy = s.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        parts.append(torch.where(in_shard, sy, torch.zeros_like(sy)))
        if cfg.label_smoothing > 0.0:
            parts.append(s.sum(-1))
    check = need_kd and dt == torch.float32
    if check:
        # magnitude of what the divergence terms are formed from (their rounding error scale)
        mag = (logp.exp() + logq.exp()) * (logp.abs() + logq.abs())
        parts.append(torch.where(torch.isfinite(mag), mag, torch.zeros_like(mag)).sum(-1))
    red = _all_reduce(torch.stack(parts, -1), dist.ReduceOp.SUM, group, world)

    rows = torch.zeros(n, dtype=dt, device=s.device)
    kd_stats = None
    if need_kd:
        c = temp * temp if cfg.scale_t2 else 1.0
        if cfg.divergence == Divergence.JSD:
            kd_stats = red[:, 0:2]
            d = cfg.beta * red[:, 0] + (1.0 - cfg.beta) * red[:, 1]
            j = 2
        else:
            kd_stats = red[:, 0:1]
            d = red[:, 0]
            j = 1
        rows = rows + (1.0 - alpha) * c * d
    ill = False
    if check:
        # + 2: the rounding of the two partition sums themselves (log Z has an absolute error ~eps)
        mag = red[:, -1] + st_a[:, 1].abs() + st_b[:, 1].abs() + 2.0
        err = torch.finfo(torch.float32).eps * mag
        if cfg.reduction == Reduction.NONE:  # every row on its own
            ill = bool(((w > 0) & (err > _COND_RTOL * d.abs())).any())
        else:  # the reduced loss: its summed error bound against its size
            ill = bool((w * err).sum() > _COND_RTOL * (w * d.abs()).sum())
    if need_ce:
        nll = lse1 - red[:, j if need_kd else 0]
        eps = cfg.label_smoothing
        if eps > 0.0:
            ssum = red[:, (j if need_kd else 0) + 1]
            nll = (1.0 - eps) * nll - eps * (ssum / v_global - lse1)
        rows = rows + alpha * nll
    rows = rows * w
    count = float(w.sum()) if labels is not None else float(n)
    denom = 1.0
    if cfg.reduction == Reduction.NONE:
        loss = rows
    else:
        total = rows.sum()
        if cfg.reduction == Reduction.BATCHMEAN:
            denom = max(count, 1.0)
        elif cfg.reduction == Reduction.MEAN:
            denom = max(count, 1.0) * v_global
        loss = total / denom

    empty = s.new_empty(0)
    stats = (st_a if need_kd else empty, st_b if need_kd else empty,
             lse1 if need_ce else empty, kd_stats if kd_stats is not None else empty)
    return loss, stats, denom, ill


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_in, t_in, labels, cfg: KDConfig, start: int, v_global: int, group, world: int):
        fp64 = s_in.dtype == torch.float64 or cfg.temperature > FP64_ABOVE_T
        dt = torch.float64 if fp64 else torch.float32
        args = (s_in, t_in, labels, cfg, start, v_global, group, world)
        loss, stats, denom, ill = _forward(*args, dt)
        if ill:  # same decision on every rank (all-reduced inputs): redo the rows in float64
            dt = torch.float64
            loss, stats, denom, _ = _forward(*args, dt)
        ctx.save_for_backward(s_in, t_in, labels if labels is not None else s_in.new_empty(0), *stats)
        ctx.cfg, ctx.start, ctx.v_global, ctx.dt, ctx.denom = cfg, start, v_global, dt, denom
        ctx.has_labels = labels is not None
        out_dt = torch.float64 if s_in.dtype == torch.float64 else torch.float32
        return loss.to(out_dt)

    @staticmethod
    def backward(ctx, g):
        s_in, t_in, labels, st_a, st_b, lse1, kd_stats = ctx.saved_tensors
        cfg: KDConfig = ctx.cfg
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_s or need_t):
            return (None,) * 8
        dt = ctx.dt
        labels = labels if ctx.has_labels else None
        s, t, w = _prepare(s_in, t_in, labels, cfg, dt)
        g = g.to(dt)
        gr = (g * w if cfg.reduction == Reduction.NONE else g * w / ctx.denom).unsqueeze(-1)
        temp, alpha = cfg.temperature, cfg.hard_weight
        need_kd, need_ce = alpha < 1.0, alpha > 0.0
        need_t = need_t and need_kd  # the CE term does not involve the teacher
        gs = torch.zeros_like(s) if need_s else None
        gt = torch.zeros_like(t) if need_t else None
        if need_kd:
            kc = (1.0 - alpha) * (temp * temp if cfg.scale_t2 else 1.0) / temp
            logq = _log_softmax(s / temp if temp != 1.0 else s, st_a)
            logp = _log_softmax(t / temp if temp != 1.0 else t, st_b)
            q, p = logq.exp(), logp.exp()
            zero = torch.zeros_like(q)
            if cfg.divergence == Divergence.FORWARD_KL:
                da = q - p if need_s else None
                db = torch.where(p > 0, p * (logp - logq - kd_stats[:, 0:1]), zero) if need_t else None
            elif cfg.divergence == Divergence.REVERSE_KL:
                da = torch.where(q > 0, q * (logq - logp - kd_stats[:, 0:1]), zero) if need_s else None
                db = p - q if need_t else None
            else:
                beta = cfg.beta
                logm = _log_mix(logp, logq, beta)
                da = (torch.where(q > 0, (1.0 - beta) * q * (logq - logm - kd_stats[:, 1:2]), zero)
                      if need_s else None)
                db = (torch.where(p > 0, beta * p * (logp - logm - kd_stats[:, 0:1]), zero)
                      if need_t else None)
            if need_s:
                gs = gs + kc * da
            if need_t:
                gt = gt + kc * db
        if need_ce and need_s:
            eps = cfg.label_smoothing
            dce = (s - lse1.unsqueeze(-1)).exp()
            if eps > 0.0:
                dce = dce - eps / ctx.v_global
            start, vl = ctx.start, s.shape[-1]
            in_shard = (labels >= start) & (labels < start + vl) & (labels != cfg.ignore_index)
            idx = torch.where(in_shard, labels - start, torch.zeros_like(labels))
            dce = dce.scatter_add(-1, idx.unsqueeze(-1),
                                  -(1.0 - eps) * in_shard.to(dt).unsqueeze(-1))
            gs = gs + alpha * dce
        grad_s = (gs * gr).to(s_in.dtype).reshape(s_in.shape) if need_s else None
        grad_t = (gt * gr).to(t_in.dtype).reshape(t_in.shape) if need_t else None
        return grad_s, grad_t, None, None, None, None, None, None


# --------------------------------------------------------------------------- entry points


def vocab_parallel_kd_loss(
    student_shard: Tensor,
    teacher_shard: Tensor,
    temperature: float = 1.0,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    vocab_start: Optional[int] = None,
    reduction: str = "batchmean",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    labels: Optional[Tensor] = None,
    hard_weight: Optional[float] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    scale_t2: bool = True,
) -> Tensor:
    """:func:`kdengine.kd_loss` over logits sharded along the vocabulary across a process group.

    Args:
        student_shard: ``(..., V_local)`` raw student logits of this rank's vocabulary slice.
        teacher_shard: ``(..., V_local)`` raw teacher logits of the same slice (differentiable too
            when it requires grad).
        temperature: finite T > 0 (``inf`` raises a ValueError).
        group: the process group the vocabulary is sharded over (default: the default group; with
            no initialised group the call is a single-process ``kd_loss``).
        vocab_start: first global vocabulary index of this rank's slice. Default: inferred by
            all-gathering the shard sizes, rank r holding the slice after those of ranks < r.
            Given, the slices of all ranks must tile ``[0, V)`` exactly.
        reduction, divergence, beta, hard_weight, ignore_index, label_smoothing, scale_t2: as in
            :func:`kdengine.kd_loss` (``mean`` divides by the *global* V).
        labels: ``(...)`` integer *global* vocabulary indices (same tensor on every rank), or None.

    Returns:
        The loss, identical on every rank: float32 (float64 for float64 inputs), a scalar or per
        row for ``"none"``. Gradients flow to each rank's own shard(s).

    Raises:
        TypeError: an argument of the wrong type (raised locally, before any collective).
        ValueError: invalid options, or shards/options that disagree across the process group;
            raised on every rank, naming the argument.
    """
    s = _check_tensor("student_shard", student_shard)
    t = _check_tensor("teacher_shard", teacher_shard)
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool) \
            and math.isinf(float(temperature)):
        raise ValueError("temperature must be finite for vocab_parallel_kd_loss (T = inf is not "
                         "supported; use kdengine.kd_loss on gathered logits)")
    if vocab_start is not None and (isinstance(vocab_start, bool)
                                    or not isinstance(vocab_start, numbers.Integral)):
        raise TypeError(f"vocab_start must be an int or None, got {type(vocab_start).__name__}")
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    need_t = bool(t.requires_grad and torch.is_grad_enabled())
    cfg = make_config(temperature, reduction, divergence, beta, hard_weight, labels is not None,
                      ignore_index, label_smoothing, scale_t2, need_t)
    rank, world = _world(group)
    lab = labels.to(device=s.device, dtype=torch.int64) if labels is not None else None
    desc, _ = _describe(s, t, lab, cfg, None if vocab_start is None else int(vocab_start))
    sizes, starts = _check_group(_all_gather(desc, group, world), rank)
    v_global = sum(sizes)
    if lab is not None and lab.numel() > 0:
        bad = (lab != cfg.ignore_index) & ((lab < 0) | (lab >= v_global))
        if bool(bad.any()):  # labels agree across ranks (checksum), so every rank raises
            raise ValueError(f"labels must be global vocabulary indices in [0, {v_global}) or "
                             f"ignore_index={cfg.ignore_index}; found {lab[bad].flatten()[0].item()}")
    lead = s.shape[:-1]
    lab2 = lab.reshape(-1) if lab is not None else None
    loss = _VocabParallelKD.apply(s, t, lab2, cfg, starts[rank], v_global, group, world)
    if cfg.reduction == Reduction.NONE:
        loss = loss.reshape(lead)
    return loss


def vocab_parallel_linear_kd_loss(
    hidden: Tensor,
    weight_shard: Tensor,
    teacher_hidden: Tensor,
    teacher_weight_shard: Tensor,
    temperature: float = 1.0,
    *,
    bias_shard: Optional[Tensor] = None,
    teacher_bias_shard: Optional[Tensor] = None,
    **kwargs,
) -> Tensor:
    """Vocab-parallel KD with the LM *head* sharded: rank r holds rows ``[start, start + V_local)``
    of the student and teacher output projections.

    ``hidden`` ``(..., H)`` and ``teacher_hidden`` ``(..., H_t)`` are replicated on every rank;
    ``weight_shard`` ``(V_local, H)`` and ``teacher_weight_shard`` ``(V_local, H_t)`` are this
    rank's slices (same V_local). The local logits ``hidden @ weight_shard.T (+ bias)`` go through
    :func:`vocab_parallel_kd_loss` (``kwargs``: its options), so gradients reach ``hidden``,
    ``weight_shard`` and the biases. Note that the gradient of the replicated ``hidden`` is this
    rank's *partial* sum: all-reduce it (SUM) over the group, as for any row-parallel layer.
    """
    for name, x in (("hidden", hidden), ("weight_shard", weight_shard),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight_shard", teacher_weight_shard)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if weight_shard.dim() != 2 or weight_shard.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight_shard must have shape (V_local, {hidden.shape[-1]}), got "
                         f"{tuple(weight_shard.shape)}")
    if teacher_weight_shard.dim() != 2 or teacher_weight_shard.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(f"teacher_weight_shard must have shape (V_local, {teacher_hidden.shape[-1]}), "
                         f"got {tuple(teacher_weight_shard.shape)}")
    s = torch.nn.functional.linear(hidden, weight_shard, bias_shard)
    t = torch.nn.functional.linear(teacher_hidden, teacher_weight_shard, teacher_bias_shard)
    return vocab_parallel_kd_loss(s, t, temperature, **kwargs)
