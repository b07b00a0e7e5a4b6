"""MetaDistil: a teacher that learns to teach (Zhou, Xu, McAuley, ACL 2022; docs/papers.md s5).

One round on a training batch ``(x, y)`` and a quiz batch ``(x_q, y_q)`` from a held-out split::

    L_S(theta_s, theta_t) = a * KD_T(student(x), teacher(x)) + (1 - a) * CE(student(x), y)
    1. pilot    theta_s' = theta_s - lr_pilot * grad_{theta_s} L_S(theta_s, theta_t)   (graph kept)
    2. quiz     L_q(theta_t) = CE(student_{theta_s'}(x_q), y_q)
                g_t = d L_q / d theta_t      (second order: flows through theta_s'(theta_t))
    3. teacher  theta_t <- teacher_opt step with g_t, its norm clipped to ``teacher_clip``
    4. student  theta_s <- student_opt step on L_S(theta_s, theta_t_new) on the same x,
                from the original theta_s (the pilot copy is discarded)

Everything is model-agnostic: the pilot student is a *functional* copy, built with
``torch.func.functional_call`` on a parameter dict, and the nested ``torch.func.grad`` keeps the
inner gradient differentiable (the functorch equivalent of ``autograd.grad(create_graph=True)``).
The KD term uses :func:`kdengine.kd_loss` with the pure-torch ``"reference"`` backend, because the
fused backends' backward is a saved first-order gradient and cannot be differentiated again.

The released schedule: the teacher is left as pre-trained for the first ``teacher_frozen_fraction``
of the ``total_steps`` rounds (plain KD; the released code uses 0.625), then meta-updated every
``meta_every`` rounds; the pilot step follows the student optimizer's learning rate at each round,
so it decays with the student's schedule.

Choices the paper leaves open (made parameters): the pilot step is plain SGD (no momentum) with the
student's current learning rate (or a fixed ``pilot_lr``), whatever the real student optimizer is;
buffers (BatchNorm running stats) are cloned for the pilot and quiz passes so the virtual step
never touches the real statistics; the teacher's frozen parameters (``requires_grad=False``) are
left out of the meta-gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value

from kdengine.ops import kd_loss

__all__ = ["quiz_split", "student_objective", "pilot_update", "quiz_loss_after_pilot",
           "meta_gradient", "MetaDistil"]


def quiz_split(n: int, quiz_fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded held-out split of ``n`` training indices into (train, quiz), default 9:1.

    Returns two disjoint sorted int64 index tensors covering ``range(n)``; the quiz part has
    ``round(n * quiz_fraction)`` indices (at least 1, at most ``n - 1``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2 (a train and a quiz part), got {n!r}")
    if not (0.0 < float(quiz_fraction) < 1.0):
        raise ValueError(f"quiz_fraction must be in (0, 1), got {quiz_fraction!r}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    n_q = min(max(int(round(n * quiz_fraction)), 1), n - 1)
    return perm[n_q:].sort().values, perm[:n_q].sort().values


def student_objective(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                      alpha: float = 0.5, temperature: float = 4.0) -> Tensor:
    """``L_S = alpha * T^2 KL(p_t || q_s) + (1 - alpha) * CE(student, labels)``, twice differentiable.

    ``student_logits``/``teacher_logits``: ``(N, C)``; ``labels``: ``(N,)`` int64. Differentiable in
    both logits (the teacher's gradient is what the meta step needs).
    """
    kd = kd_loss(student_logits, teacher_logits, temperature, backend="reference")
    ce = F.cross_entropy(student_logits, labels)
    return alpha * kd + (1.0 - alpha) * ce


def _split_params(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Trainable parameters (detached leaves) and cloned buffers of ``module``."""
    params = {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}
    return params, buffers


def pilot_update(student: nn.Module, teacher: nn.Module, s_params: dict[str, Tensor],
                 t_params: dict[str, Tensor], x: Tensor, y: Tensor, *, pilot_lr: float,
                 alpha: float, temperature: float,
                 s_buffers: Optional[dict[str, Tensor]] = None,
                 t_buffers: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """``theta_s' = theta_s - pilot_lr * grad_{theta_s} L_S(x; theta_s, theta_t)`` as a new dict.

    Functional in both parameter dicts; called under a ``torch.func.grad`` over ``t_params`` the
    result stays differentiable in the teacher (second order).
    """
    s_buffers = {} if s_buffers is None else s_buffers
    t_buffers = {} if t_buffers is None else t_buffers

    # Buffers are explicit inputs of the transformed function: BatchNorm updates its running
    # statistics in place, and functorch only allows in-place writes to the function's inputs.
    def inner(sp: dict[str, Tensor], tp: dict[str, Tensor], sb: dict[str, Tensor],
              tb: dict[str, Tensor]) -> Tensor:
        t_logits = functional_call(teacher, (tp, tb), (x,))
        s_logits = functional_call(student, (sp, sb), (x,))
        return student_objective(s_logits, t_logits, y, alpha, temperature)

    g = grad(inner)(s_params, t_params, s_buffers, t_buffers)
    return {k: s_params[k] - pilot_lr * g[k] for k in s_params}


def quiz_loss_after_pilot(student: nn.Module, teacher: nn.Module, t_params: dict[str, Tensor],
                          s_params: dict[str, Tensor], x: Tensor, y: Tensor, x_quiz: Tensor,
                          y_quiz: Tensor, *, pilot_lr: float, alpha: float, temperature: float,
                          s_buffers: Optional[dict[str, Tensor]] = None,
                          t_buffers: Optional[dict[str, Tensor]] = None) -> Tensor:
    """``L_q(theta_t) = CE(y_q, student_{theta_s'(theta_t)}(x_q))``: the teacher's meta objective."""
    sp_new = pilot_update(student, teacher, s_params, t_params, x, y, pilot_lr=pilot_lr,
                          alpha=alpha, temperature=temperature, s_buffers=s_buffers,
                          t_buffers=t_buffers)
    logits = functional_call(student, (sp_new, {} if s_buffers is None else s_buffers), (x_quiz,))
    return F.cross_entropy(logits, y_quiz)


def _check_batch(name: str, x: object, yname: str, y: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        raise TypeError(f"{yname} must be a 1-D int64 tensor of class labels")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name} and {yname} must have the same non-zero batch size, got "
                         f"{x.shape[0]} and {y.shape[0]}")


def meta_gradient(student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, x_quiz: Tensor,
                  y_quiz: Tensor, *, pilot_lr: float, alpha: float = 0.5,
                  temperature: float = 4.0) -> tuple[dict[str, Tensor], Tensor]:
    """Second-order meta-gradient of the quiz loss w.r.t. the teacher's trainable parameters.

    Neither module is modified (buffers are cloned, parameters read). Returns
    ``(grads, quiz_loss)``: ``grads`` maps each trainable teacher parameter name to a tensor of its
    shape, ``quiz_loss`` is the 0-dim quiz CE after the pilot step (detached).
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("student and teacher must be nn.Module instances")
    _check_batch("x", x, "y", y)
    _check_batch("x_quiz", x_quiz, "y_quiz", y_quiz)
    if not (float(pilot_lr) > 0):
        raise ValueError(f"pilot_lr must be > 0, got {pilot_lr!r}")
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    s_params, s_buffers = _split_params(student)
    t_params, t_buffers = _split_params(teacher)
    if not t_params:
        raise ValueError("teacher has no trainable parameters (requires_grad=False everywhere): "
                         "MetaDistil updates the teacher")
    if not s_params:
        raise ValueError("student has no trainable parameters")

    def outer(tp: dict[str, Tensor], sb: dict[str, Tensor], tb: dict[str, Tensor]) -> Tensor:
        return quiz_loss_after_pilot(student, teacher, tp, s_params, x, y, x_quiz, y_quiz,
                                     pilot_lr=float(pilot_lr), alpha=float(alpha),
                                     temperature=temperature, s_buffers=sb, t_buffers=tb)

    grads, q = grad_and_value(outer)(t_params, s_buffers, t_buffers)
    return grads, q.detach()


class MetaDistil:
    """MetaDistil training procedure for any (student, teacher) pair of classifiers.

    Args:
        student, teacher: ``nn.Module`` mapping a batch to ``(N, C)`` logits.
        student_opt, teacher_opt: optimizers over the student's / teacher's parameters.
        alpha: weight of the KD term in ``L_S`` (1 - alpha on CE).
        temperature: KD temperature.
        pilot_lr: a fixed SGD step for the pilot update; ``None`` (default): the student
            optimizer's first param group's ``lr`` at each round, so a scheduler decays both.
        teacher_clip: max global norm of the teacher's meta-gradient (``None``: no clipping).
        meta_every: do the meta (teacher) update every ``meta_every`` calls of :meth:`step`; the
            other calls are plain KD steps with the current teacher.
        teacher_frozen_fraction: no meta update during the first ``teacher_frozen_fraction *
            total_steps`` calls of :meth:`step` (rounded up); needs ``total_steps`` when > 0.
        total_steps: the number of :meth:`step` calls of the whole training run.

    :meth:`step` runs one round and returns floats: ``loss`` (L_S of the real update),
    ``quiz_loss`` and ``teacher_grad_norm`` (before clipping; NaN on non-meta steps).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, student_opt: torch.optim.Optimizer,
                 teacher_opt: torch.optim.Optimizer, *, alpha: float = 0.5,
                 temperature: float = 4.0, pilot_lr: Optional[float] = None,
                 teacher_clip: Optional[float] = 1.0, meta_every: int = 1,
                 teacher_frozen_fraction: float = 0.0, total_steps: Optional[int] = None) -> None:
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("student and teacher must be nn.Module instances")
        if not (0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not (float(temperature) > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if teacher_clip is not None and not (float(teacher_clip) > 0):
            raise ValueError(f"teacher_clip must be > 0 or None, got {teacher_clip!r}")
        if isinstance(meta_every, bool) or not isinstance(meta_every, int) or meta_every < 1:
            raise ValueError(f"meta_every must be an int >= 1, got {meta_every!r}")
        if not (0.0 <= float(teacher_frozen_fraction) <= 1.0):
            raise ValueError(f"teacher_frozen_fraction must be in [0, 1], got {teacher_frozen_fraction!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be an int >= 1 or None, got {total_steps!r}")
        if float(teacher_frozen_fraction) > 0 and total_steps is None:
            raise ValueError("teacher_frozen_fraction > 0 needs total_steps")
        if pilot_lr is not None and not (float(pilot_lr) > 0):
            raise ValueError(f"pilot_lr must be > 0, got {pilot_lr!r}")
        self.student, self.teacher = student, teacher
        self.student_opt, self.teacher_opt = student_opt, teacher_opt
        self.alpha, self.temperature = float(alpha), float(temperature)
        self._fixed_pilot_lr = None if pilot_lr is None else float(pilot_lr)
        self.teacher_clip = teacher_clip
        self.meta_every = meta_every
        self.first_meta_step = (0 if total_steps is None else
                                math.ceil(float(teacher_frozen_fraction) * total_steps - 1e-9))
        self._calls = 0

    @property
    def pilot_lr(self) -> float:
        """The pilot step size of the next round."""
        if self._fixed_pilot_lr is not None:
            return self._fixed_pilot_lr
        lr = float(self.student_opt.param_groups[0]["lr"])
        # a cosine schedule ends at exactly 0; the pilot step (and the meta-gradient) is then 0
        return max(lr, 1e-12)

    def meta_step(self, x: Tensor, y: Tensor, x_quiz: Tensor, y_quiz: Tensor) -> tuple[float, float]:
        """Steps 1-3: meta-gradient to the teacher and one teacher optimizer step."""
        grads, q = meta_gradient(self.student, self.teacher, x, y, x_quiz, y_quiz,
                                 pilot_lr=self.pilot_lr, alpha=self.alpha,
                                 temperature=self.temperature)
        named = dict(self.teacher.named_parameters())
        self.teacher_opt.zero_grad(set_to_none=True)
        for k, g in grads.items():
            named[k].grad = g.detach().to(named[k].dtype)
        params = [named[k] for k in grads]
        if self.teacher_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, float(self.teacher_clip))
        else:
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
        self.teacher_opt.step()
        self.teacher_opt.zero_grad(set_to_none=True)
        return float(q), float(norm)

    def student_step(self, x: Tensor, y: Tensor) -> float:
        """Step 4: the real student update with the (updated) teacher as a fixed target."""
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        loss = student_objective(s_logits, t_logits, y, self.alpha, self.temperature)
        self.student_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.student_opt.step()
        return float(loss.detach())

    def step(self, x: Tensor, y: Tensor, x_quiz: Tensor, y_quiz: Tensor) -> dict[str, float]:
        """One MetaDistil round (after the frozen phase, a meta update of the teacher every
        ``meta_every`` calls)."""
        q, norm = float("nan"), float("nan")
        k = self._calls - self.first_meta_step
        if k >= 0 and k % self.meta_every == 0:
            q, norm = self.meta_step(x, y, x_quiz, y_quiz)
        self._calls += 1
        loss = self.student_step(x, y)
        return {"loss": loss, "quiz_loss": q, "teacher_grad_norm": norm}
