"""``kd_loss``: the one entry point of the fused temperature softmax-KL loss.

It validates the inputs, flattens them to ``(N, V)``, picks a backend (:mod:`kdengine._dispatch`)
and runs it. Kernel backends go through the ``kdengine::kd_loss_fwd`` torch.library op, which
returns the loss together with the gradient(s) computed in the same pass; its backward is a scale
of the saved gradient, so a model calling ``kd_loss`` compiles under ``torch.compile``.

Backend contract (every entry of the registry implements it)::

    impl(student, teacher, labels, cfg) -> (loss, grad_student, grad_teacher | None)

``student``/``teacher``: contiguous ``(N, V)`` of one floating dtype; ``labels``: contiguous
``(N,)`` int64 or None; ``cfg``: :class:`~kdengine.ops.kd_loss.config.KDConfig`. ``loss``: float32
(float64 for float64 inputs), 0-dim for scalar reductions, ``(N,)`` for ``"none"``.
``grad_student`` = d loss / d student in the input dtype (for ``"none"``: d loss_r / d student_r,
row by row); ``grad_teacher`` likewise, or None unless ``cfg.need_teacher_grad``. The semantics
are those of :mod:`kdengine.ops.kd_loss.reference`. A label outside ``[0, V)`` that is not
``ignore_index`` must give a NaN row, never an out-of-bounds read (the eager entry point raises
before that; compiled graphs cannot).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from kdengine import _dispatch
from kdengine._checks import floating_tensor, real_number
from kdengine.ops.kd_loss.reference import LARGE_T
from kdengine.ops.kd_loss.config import (
    DIVERGENCE_NAMES,
    REDUCTION_NAMES,
    Divergence,
    KDConfig,
    Reduction,
)

OP = "kd_loss"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------- validation


def _check_logits(name: str, x: object) -> Tensor:
    x = floating_tensor(name, x, FLOAT_DTYPES, tensor_of=" of logits", listed=True,
                        values_of=" of raw logits")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., V) with a vocabulary dimension, got a 0-dim tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0); expected V >= 1")
    return x


_check_float = real_number


def check_hard_ce(hard_weight: object, has_labels: bool, ignore_index: object,
                  label_smoothing: object) -> tuple[float, int, float]:
    """The hard-label CE options, checked: ``(alpha, ignore_index, label_smoothing)``; alpha
    defaults to 0.5 with labels and 0 without."""
    if hard_weight is None:
        alpha = 0.5 if has_labels else 0.0
    else:
        alpha = _check_float("hard_weight", hard_weight)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"hard_weight must be in [0, 1], got {alpha}")
    if alpha > 0.0 and not has_labels:
        raise ValueError(f"hard_weight={alpha} needs labels=; pass labels or hard_weight=0")
    eps = _check_float("label_smoothing", label_smoothing)
    if not (0.0 <= eps < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {eps}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return alpha, int(ignore_index), eps


def make_config(
    temperature: object,
    reduction: str,
    divergence: str,
    beta: object,
    hard_weight: object,
    has_labels: bool,
    ignore_index: int,
    label_smoothing: object,
    scale_t2: bool,
    need_teacher_grad: bool,
) -> KDConfig:
    t = _check_float("temperature", temperature)
    if math.isnan(t) or t <= 0:
        raise ValueError(f"temperature must be > 0 (or float('inf')), got {t}")
    if not isinstance(scale_t2, bool):
        raise TypeError(f"scale_t2 must be a bool, got {type(scale_t2).__name__}")
    if math.isfinite(t) and (1.0 / t == math.inf or (scale_t2 and t * t == math.inf)):
        raise ValueError(
            f"temperature={t} is out of range: 1/T or T^2 overflows float64 (use a normal "
            "number, or float('inf') for the exact T -> inf limit)"
        )
    if math.isinf(t) and not scale_t2:
        raise ValueError(
            "temperature=inf needs scale_t2=True: without the T^2 factor the divergence is 0 in "
            "the limit; the T^2-scaled limit is the centered logits-matching loss"
        )
    if reduction not in REDUCTION_NAMES:
        raise ValueError(f"reduction must be one of {sorted(REDUCTION_NAMES)}, got {reduction!r}")
    if divergence not in DIVERGENCE_NAMES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCE_NAMES)}, got {divergence!r}")
    div = DIVERGENCE_NAMES[divergence]
    b = _check_float("beta", beta)
    if div == Divergence.JSD and not (0.0 < b < 1.0):
        raise ValueError(
            f"beta must be in (0, 1) for divergence='jsd', got {b}; use divergence='forward_kl' "
            "or 'reverse_kl' for the end points"
        )
    alpha, ignore_index, eps = check_hard_ce(hard_weight, has_labels, ignore_index, label_smoothing)
    return KDConfig(
        temperature=t,
        scale_t2=scale_t2,
        divergence=div,
        beta=b,
        hard_weight=alpha,
        ignore_index=int(ignore_index),
        label_smoothing=eps,
        reduction=REDUCTION_NAMES[reduction],
        need_teacher_grad=need_teacher_grad,
    )


def _check_labels(labels: object, student: Tensor, ignore_index: int) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(student.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(student.shape[:-1])} (the logits' leading dims), "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != student.device:
        raise ValueError(
            f"labels are on {labels.device} but student_logits on {student.device}; expected one device"
        )
    labels = labels.to(torch.int64)
    if not torch.compiler.is_compiling() and labels.numel() > 0:
        v = student.shape[-1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(
                f"labels must be in [0, {v}) or equal ignore_index={ignore_index}; found {first}"
            )
    return labels


# --------------------------------------------------------------------------- the library op

_LIB_OP = "kdengine::kd_loss_fwd"


@torch.library.custom_op(_LIB_OP, mutates_args=())
def _kd_loss_fwd(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    backend: str,
    temperature: float,
    scale_t2: bool,
    divergence: int,
    beta: float,
    hard_weight: float,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    need_teacher_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    cfg = KDConfig(
        temperature, scale_t2, Divergence(divergence), beta, hard_weight, ignore_index,
        label_smoothing, Reduction(reduction), need_teacher_grad,
    )
    impl = _dispatch.implementation(OP, backend)
    loss, gs, gt = impl(student, teacher, labels, cfg)
    if gt is None:
        gt = student.new_empty((0,))
    return loss, gs, gt


def _loss_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_kd_loss_fwd.register_fake
def _(student, teacher, labels, backend, temperature, scale_t2, divergence, beta, hard_weight,
      ignore_index, label_smoothing, reduction, need_teacher_grad):
    n = student.shape[0]
    shape = (n,) if reduction == Reduction.NONE else ()
    loss = student.new_empty(shape, dtype=_loss_dtype(student))
    gs = torch.empty_like(student)
    gt = torch.empty_like(teacher) if need_teacher_grad else student.new_empty((0,))
    return loss, gs, gt


def _setup_context(ctx, inputs, output) -> None:
    _, gs, gt = output
    # The gradient outputs are side products nobody differentiates; without this autograd would
    # fill two N x V zero tensors for them in every backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gs, gt)
    ctx.backend = inputs[3]
    ctx.reduction = inputs[11]
    ctx.need_teacher_grad = inputs[12]


def _fresh_alias(saved: Tensor) -> Tensor:
    """A plain tensor over ``saved``'s memory: not a view, with its own version counter, so the
    user may edit it in place like any gradient. Only for a buffer nobody else will read again."""
    with torch.no_grad():
        out = saved.new_empty((0,))
        out.set_(saved.untyped_storage(), saved.storage_offset(), saved.size(), saved.stride())
    return out


def _scale(saved: Tensor, g: Tensor, reduction: int) -> Tensor:
    """The whole backward: the saved gradient times the incoming one (rows for 'none')."""
    if reduction == Reduction.NONE:
        return (saved * g.to(saved.dtype if saved.dtype == torch.float64 else torch.float32)
                .unsqueeze(-1)).to(saved.dtype)
    # The usual loss.backward(): the saved buffer is the gradient, and the backward pass costs
    # no N x V traffic at all. On a GPU the check is one host sync, far cheaper than the
    # read + write of the multiply. Compiled graphs cannot branch on data, so they multiply.
    if not torch.compiler.is_compiling() and float(g) == 1.0:
        # The buffer is handed out only when the graph is freed after this pass (nobody reads
        # the saved copy again, so the user owns it); a retained graph gets a copy, or an
        # in-place edit of the gradient (a.grad.zero_()) would change the next pass's result.
        if torch._C._autograd._get_current_graph_task_keep_graph():
            return saved.clone()
        return _fresh_alias(saved)
    return saved * g.to(saved.dtype if saved.dtype == torch.float64 else torch.float32)


def _backward(ctx, g_loss, _g_gs, _g_gt):
    if torch.is_grad_enabled():
        # create_graph=True: the saved gradient is a constant here, so the gradient's own graph
        # would miss its dependence on the logits (a silently wrong Hessian).
        raise RuntimeError(
            f"kd_loss: the {ctx.backend} backend does not support double backward "
            "(create_graph=True, Hessian-vector products, gradient penalties); use "
            "backend='reference' (torch.func transforms use it automatically)"
        )
    gs, gt = ctx.saved_tensors
    if g_loss is None:  # grads are not materialized: no gradient flowed into the loss
        return (None,) * 13
    grad_s = _scale(gs, g_loss, ctx.reduction) if ctx.needs_input_grad[0] else None
    grad_t = None
    if ctx.need_teacher_grad and ctx.needs_input_grad[1]:
        grad_t = _scale(gt, g_loss, ctx.reduction)
    return (grad_s, grad_t) + (None,) * 11


_kd_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry point


def _under_functorch(*xs: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    try:
        is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    except AttributeError:  # pragma: no cover - older torch
        return False
    return any(is_wrapped(x) for x in xs)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    reduction: str = "batchmean",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    labels: Optional[Tensor] = None,
    hard_weight: Optional[float] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    scale_t2: bool = True,
    backend: Optional[str] = None,
) -> Tensor:
    """Temperature-scaled softmax-KL distillation loss on raw logits, fused with hard-label CE.

    Args:
        student_logits: ``(..., V)`` float32/bfloat16/float16/float64 raw student logits.
        teacher_logits: ``(..., V)`` raw teacher logits, same shape and device (a different
            floating dtype is converted to the student's). Differentiable too when it requires grad.
        temperature: T > 0, or ``float("inf")`` for the exact T -> inf limit (centered logits
            matching, on the same scale as T^2 KL; docs/papers.md section 1).
        reduction: ``"batchmean"`` (sum over V, mean over rows; default), ``"sum"``, ``"mean"``
            (mean over all elements, torch's kl_div parity) or ``"none"`` (per row, shape ``...``).
        divergence: ``"forward_kl"`` (KL(teacher || student), default), ``"reverse_kl"`` or
            ``"jsd"`` (generalized Jensen-Shannon with weight ``beta`` in (0, 1) on the teacher).
        labels: optional ``(...)`` integer class indices; adds ``hard_weight`` * CE(labels) at T = 1.
        hard_weight: alpha in [0, 1]: loss = alpha CE + (1 - alpha) T^2 D. Default 0.5 with labels,
            0 without.
        ignore_index: label value whose rows drop out of both terms and of the batchmean count.
        label_smoothing: epsilon for the CE term.
        scale_t2: multiply the divergence by T^2 (default) so gradients keep their scale across T.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"`` (default: the
            ``KDENGINE_BACKEND`` variable, else auto).

    Returns:
        The loss in the student's dtype (fp32 math inside): a scalar, or per row for ``"none"``.
    """
    s = _check_logits("student_logits", student_logits)
    t = _check_logits("teacher_logits", teacher_logits)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student_logits has V={s.shape[-1]} but teacher_logits has "
            f"V={t.shape[-1]}; slice or pad one of them to a common vocabulary first"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(s.shape)} "
            f"and {tuple(t.shape)}"
        )
    if s.device != t.device:
        raise ValueError(
            f"student_logits are on {s.device} but teacher_logits on {t.device}; expected one device"
        )
    if t.dtype != s.dtype:
        t = t.to(s.dtype)
    need_t = bool(t.requires_grad and torch.is_grad_enabled())
    cfg = make_config(
        temperature, reduction, divergence, beta, hard_weight, labels is not None, ignore_index,
        label_smoothing, scale_t2, need_t,
    )
    lab = _check_labels(labels, s, cfg.ignore_index) if labels is not None else None

    lead = s.shape[:-1]
    v = s.shape[-1]
    s2 = s.reshape(-1, v).contiguous()
    t2 = t.reshape(-1, v).contiguous()
    lab2 = lab.reshape(-1).contiguous() if lab is not None else None

    name = _dispatch.resolve(OP, s.device, backend)
    if math.isfinite(cfg.temperature) and cfg.temperature > LARGE_T:
        # Large T: the divergence is ~1/T^2 of terms of size ~1; the fused kernels' float
        # formulation cancels there, the reference's small-log-ratio form does not.
        name = "reference"
    if _under_functorch(s2, t2):
        # torch.func transforms (grad, vmap, jacrev, ...) cannot see through the fused op's
        # saved-gradient backward: they differentiate the reference formulation instead.
        name = "reference"
    if s2.shape[0] == 0 or name == "reference":
        from kdengine.ops.kd_loss.reference import kd_loss_reference

        loss = kd_loss_reference(s2, t2, lab2, cfg)
    else:
        loss, _, _ = _kd_loss_fwd(
            s2, t2, lab2, name, cfg.temperature, cfg.scale_t2, int(cfg.divergence), cfg.beta,
            cfg.hard_weight, cfg.ignore_index, cfg.label_smoothing, int(cfg.reduction),
            cfg.need_teacher_grad,
        )
    if cfg.reduction == Reduction.NONE:
        loss = loss.reshape(lead)
    return loss.to(s.dtype)
