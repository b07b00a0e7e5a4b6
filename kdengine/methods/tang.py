"""Tang et al., "Understanding and Improving Knowledge Distillation" (arXiv 2002.03532; docs/papers.md
section 2): three levels of teacher knowledge, each isolated as a soft-target distribution.

Notation: C classes, student logits z, teacher logits v, labels y, q = softmax(z / T),
p = softmax(v / T), c = the true class of an example. Every variant below is a *target
distribution* t (rows summing to 1) used in

    L = (1 - a) * CE(y, softmax(z)) + a * T^2 * CE(t, softmax(z / T))            (distillation_loss)

(at T = 1 this is L = (1-a) CE(y, q) + a CE(t, q); with t = p it is Hinton KD up to a constant).

Variants (the paper's exact definitions were not confirmed; these are ours, parameters exposed):

* **universe level -- label smoothing** (:func:`label_smoothing_targets`):
  ``t = (1 - eps) onehot(y) + eps / C``. Same for every example and every class.
* **instance level -- partial teacher** (:func:`partial_teacher_targets`): keep the teacher's
  true-class probability ``p_c`` and spread ``1 - p_c`` *uniformly* over the other C - 1 classes.
  It keeps the per-example confidence (hence the gradient rescaling below) but no class
  relationships.
* **domain level -- class-similarity teacher** (:func:`class_similarity_targets`): from the
  teacher's logit-layer weight rows ``w_1..w_C`` (C, d), the cosine-similarity matrix
  ``S[i, j] = <w_i, w_j> / (|w_i| |w_j|)`` and ``t = softmax(S[y] / tau)`` (row y of S, temperature
  ``tau``). It depends on the class only, never on the example: class relationships without
  instance information. (Hypothesis from the paper: classes whose weight rows point the same way
  are related, and the teacher would put mass on them.)
* **both** (:func:`combined_targets`): the teacher's true-class probability ``p_c`` per example
  (instance) with the rest ``1 - p_c`` distributed over the other classes in proportion to the
  class-similarity distribution ``softmax(S[y] / tau)`` restricted to ``j != c`` (domain).
* **plain KD** (:func:`kd_targets`): ``t = p``.

Instance-level diagnostic: at T = 1, with any target whose true-class mass is ``p_c``,
``dL/dz_c = (1-a)(q_c - 1) + a(q_c - p_c) = -(1 - q_c) * w`` with

    w = 1 - a (1 - p_c) / (1 - q_c)                                              (rescaling_weight)

relative to plain CE's ``-(1 - q_c)``: examples the teacher is confident on (p_c ~ 1) keep w ~ 1;
examples the teacher finds hard (small p_c) are down-weighted. :func:`true_class_gradient_ratio`
measures the same ratio by autograd; the tests check they agree.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdengine.models import logit_layer  # noqa: F401  (the last nn.Linear; feeds class_similarity)

VARIANTS = ("ce", "ls", "kd", "pt", "sim", "pt+sim")


# --------------------------------------------------------------------------- validation


def _check_labels(labels: Tensor, n: Optional[int], num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
        raise TypeError(f"labels must be a 1-D integer tensor, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"labels must have {n} entries (one per row), got {labels.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def _check_logits(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() != 2:
        raise TypeError(f"{name} must be a floating (N, C) tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if x.shape[1] < 2:
        raise ValueError(f"{name} needs C >= 2 classes, got {x.shape[1]}")
    return x


def _check_temperature(name: str, t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0) or not math.isfinite(t):
        raise ValueError(f"{name} must be a finite number > 0, got {t!r}")
    return float(t)


def _check_alpha(a: float) -> float:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0.0 <= a <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {a!r}")
    return float(a)


# --------------------------------------------------------------------------- targets


def label_smoothing_targets(labels: Tensor, num_classes: int, eps: float = 0.1) -> Tensor:
    """``(1 - eps) onehot(y) + eps / C``: (N, C) float32."""
    if not (0.0 <= eps < 1.0):
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    y = _check_labels(labels, None, num_classes)
    t = torch.full((y.shape[0], num_classes), eps / num_classes, device=y.device)
    t[torch.arange(y.shape[0], device=y.device), y] += 1.0 - eps
    return t


def kd_targets(teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Plain KD: ``softmax(v / T)`` (N, C)."""
    v = _check_logits("teacher_logits", teacher_logits)
    return torch.softmax(v.float() / _check_temperature("temperature", temperature), -1)


def partial_teacher_targets(teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Instance level only: true class keeps ``p_c = softmax(v/T)_c``; the other C - 1 classes get
    ``(1 - p_c) / (C - 1)`` each. (N, C)."""
    p = kd_targets(teacher_logits, temperature)
    n, c = p.shape
    y = _check_labels(labels, n, c).to(p.device)
    pc = p.gather(1, y[:, None])                       # (N, 1)
    t = ((1.0 - pc) / (c - 1)).expand(n, c).clone()
    t.scatter_(1, y[:, None], pc)
    return t


def class_similarity(weight: Tensor) -> Tensor:
    """Cosine similarity ``S`` (C, C) of the rows of a logit layer's weight ``W`` (C, d)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError("weight must be a floating (C, d) logit-layer weight matrix")
    w = F.normalize(weight.detach().float(), dim=1)
    return w @ w.T


def class_similarity_distribution(weight: Tensor, tau: float = 0.1) -> Tensor:
    """Per-class soft labels ``softmax(S[c] / tau)`` (C, C), row c for true class c."""
    return torch.softmax(class_similarity(weight) / _check_temperature("tau", tau), -1)


def class_similarity_targets(labels: Tensor, sim_dist: Tensor) -> Tensor:
    """Domain level only: row ``y`` of the (C, C) class-similarity distribution, per example."""
    if sim_dist.dim() != 2 or sim_dist.shape[0] != sim_dist.shape[1]:
        raise ValueError(f"sim_dist must be (C, C), got {tuple(sim_dist.shape)}")
    y = _check_labels(labels, None, sim_dist.shape[0])
    return sim_dist.to(y.device)[y]


def combined_targets(teacher_logits: Tensor, labels: Tensor, sim_dist: Tensor,
                     temperature: float = 1.0) -> Tensor:
    """Instance + domain: true class gets the teacher's ``p_c``; ``1 - p_c`` goes to the other
    classes in proportion to ``sim_dist[y]`` with the true class removed. (N, C)."""
    p = kd_targets(teacher_logits, temperature)
    n, c = p.shape
    y = _check_labels(labels, n, c).to(p.device)
    if tuple(sim_dist.shape) != (c, c):
        raise ValueError(f"sim_dist must be ({c}, {c}), got {tuple(sim_dist.shape)}")
    pc = p.gather(1, y[:, None])
    s = sim_dist.to(p.device)[y].clone()
    s.scatter_(1, y[:, None], 0.0)
    s = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    t = (1.0 - pc) * s
    t.scatter_(1, y[:, None], pc)
    return t


# --------------------------------------------------------------------------- loss and diagnostic


def distillation_loss(student_logits: Tensor, targets: Tensor, labels: Tensor, alpha: float,
                      temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """``(1 - a) CE(y, softmax(z)) + a T^2 CE(t, softmax(z / T))``; ``reduction`` "mean"/"sum"/"none"."""
    z = _check_logits("student_logits", student_logits)
    a = _check_alpha(alpha)
    t_ = _check_temperature("temperature", temperature)
    if targets.shape != z.shape:
        raise ValueError(f"targets must have shape {tuple(z.shape)}, got {tuple(targets.shape)}")
    y = _check_labels(labels, z.shape[0], z.shape[1])
    ce = F.cross_entropy(z, y, reduction="none")
    soft = -(targets.detach().to(z.dtype) * torch.log_softmax(z / t_, -1)).sum(-1) * t_ * t_
    per = (1.0 - a) * ce + a * soft
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.mean()
    raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")


def rescaling_weight(teacher_true_prob: Tensor, student_true_prob: Tensor, alpha: float) -> Tensor:
    """``w = 1 - a (1 - p_c) / (1 - q_c)``: the true-class logit gradient of
    ``(1-a) CE(y, q) + a CE(t, q)`` (T = 1, t_c = p_c) relative to plain CE. Elementwise; NaN
    where q_c = 1 (the CE gradient is 0 there and the ratio undefined)."""
    a = _check_alpha(alpha)
    pc, qc = teacher_true_prob, student_true_prob
    den = 1.0 - qc
    return torch.where(den == 0, torch.full_like(den, float("nan")), 1.0 - a * (1.0 - pc) / den)


def rescaling_weight_from_logits(student_logits: Tensor, targets: Tensor, labels: Tensor,
                                 alpha: float) -> Tensor:
    """:func:`rescaling_weight` with ``p_c = targets[y]`` and ``q_c = softmax(z)[y]`` (N,)."""
    z = _check_logits("student_logits", student_logits)
    y = _check_labels(labels, z.shape[0], z.shape[1])
    qc = torch.softmax(z.detach().double(), -1).gather(1, y[:, None]).squeeze(1)
    pc = targets.detach().double().gather(1, y[:, None]).squeeze(1)
    return rescaling_weight(pc, qc, alpha)


def true_class_gradient_ratio(student_logits: Tensor, targets: Tensor, labels: Tensor,
                              alpha: float) -> Tensor:
    """The same ratio by autograd: ``dL/dz_c`` of :func:`distillation_loss` (T = 1, per example)
    divided by ``dCE/dz_c``. (N,) float64."""
    z = _check_logits("student_logits", student_logits).detach().double().requires_grad_(True)
    y = _check_labels(labels, z.shape[0], z.shape[1])
    (g_l,) = torch.autograd.grad(distillation_loss(z, targets.double(), y, alpha, 1.0, "sum"), z)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    idx = y[:, None]
    return g_l.gather(1, idx).squeeze(1) / g_ce.gather(1, idx).squeeze(1)


# --------------------------------------------------------------------------- Distiller terms


def make_targets_fn(variant: str, *, num_classes: int, eps: float = 0.1, temperature: float = 1.0,
                    sim_dist: Optional[Tensor] = None) -> Callable:
    """``fn(ctx) -> (B, C)`` soft targets of a variant, for :class:`kdengine.train.SoftTargetTerm`.

    ``variant``: ``"ls"``, ``"kd"``, ``"pt"``, ``"sim"`` or ``"pt+sim"``; ``"sim"`` and ``"pt+sim"``
    need ``sim_dist`` (:func:`class_similarity_distribution` of the teacher's logit layer).
    """
    if variant == "ls":
        return lambda ctx: label_smoothing_targets(ctx.labels, num_classes, eps)
    if variant == "kd":
        return lambda ctx: kd_targets(_teacher(ctx), temperature)
    if variant == "pt":
        return lambda ctx: partial_teacher_targets(_teacher(ctx), ctx.labels, temperature)
    if variant in ("sim", "pt+sim"):
        if sim_dist is None:
            raise ValueError(f"variant {variant!r} needs sim_dist (the teacher's class-similarity distribution)")
        if variant == "sim":
            return lambda ctx: class_similarity_targets(ctx.labels, sim_dist)
        return lambda ctx: combined_targets(_teacher(ctx), ctx.labels, sim_dist, temperature)
    raise ValueError(f"variant must be one of ls, kd, pt, sim, pt+sim; got {variant!r}")


def _teacher(ctx) -> Tensor:
    if ctx.teacher_logits is None:
        raise ValueError("this variant needs teacher logits; give the Distiller a teacher or a logit cache")
    return ctx.teacher_logits


def make_terms(variant: str, *, alpha: float = 0.5, num_classes: int, eps: float = 0.1,
               temperature: float = 1.0, sim_dist: Optional[Tensor] = None) -> list:
    """Loss terms for the :class:`~kdengine.train.Distiller`:
    ``[((1 - a), CE), (a, SoftTargetTerm(variant targets, T))]`` (just CE for ``"ce"``); the
    student side is softened by T only for the teacher-logit variants (kd, pt, pt+sim), ls and sim
    use T = 1."""
    from kdengine.train import CrossEntropyTerm, SoftTargetTerm

    a = _check_alpha(alpha)
    if variant == "ce":
        return [CrossEntropyTerm()]
    fn = make_targets_fn(variant, num_classes=num_classes, eps=eps, temperature=temperature,
                         sim_dist=sim_dist)
    # targets that do not come from the teacher's logits (ls, sim) are matched at T = 1: label
    # smoothing is then the standard one (effective eps = a * eps), and T only softens teacher logits
    t_student = temperature if variant in ("kd", "pt", "pt+sim") else 1.0
    return [(1.0 - a, CrossEntropyTerm()), (a, SoftTargetTerm(fn, temperature=t_student, name=variant))]
