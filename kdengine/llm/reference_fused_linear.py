"""Float64 materialised reference of the fused linear + KD loss (the oracle of kdengine.llm).

Builds the full logits ``hidden @ W.T + b`` in float64 and applies :mod:`kdengine.ops.kd_loss.reference`;
differentiable with autograd, so the tests take its gradients as the ground truth.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from kdengine.ops.kd_loss.config import KDConfig, Reduction
from kdengine.ops.kd_loss.reference import kd_loss_reference


def materialised_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``(N, V)`` float64 logits of ``(..., H)`` hidden states (flattened)."""
    h = hidden.reshape(-1, hidden.shape[-1]).to(torch.float64)
    out = h @ weight.to(torch.float64).t()
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out


def fused_linear_kd_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    cfg: KDConfig,
    teacher_logits: Optional[Tensor] = None,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    num_items_in_batch: Optional[float] = None,
    teacher_vocab: str = "strict",
    loss_scale: float = 1.0,
) -> Tensor:
    """The loss in float64 (per row for ``Reduction.NONE``), with ``kd_loss``'s semantics.

    ``teacher_vocab="truncate"`` keeps the teacher's first V logits; ``num_items_in_batch``
    replaces the batchmean row count (``mean``: times V); ``loss_scale`` multiplies the result.
    """
    s = materialised_logits(student_hidden, student_weight, student_bias)
    v = s.shape[-1]
    if teacher_logits is not None:
        t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(torch.float64)
    else:
        t = materialised_logits(teacher_hidden, teacher_weight, teacher_bias)
    if t.shape[-1] != v:
        if teacher_vocab != "truncate" or t.shape[-1] < v:
            raise ValueError(f"teacher vocabulary {t.shape[-1]} != student {v}")
        t = t[:, :v]
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    if num_items_in_batch is None:
        return kd_loss_reference(s, t, lab, cfg) * loss_scale
    total = kd_loss_reference(s, t, lab, dataclasses.replace(cfg, reduction=Reduction.SUM))
    denom = float(num_items_in_batch) * (v if cfg.reduction == Reduction.MEAN else 1)
    return total / denom * loss_scale
