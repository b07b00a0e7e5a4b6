"""Fused linear + top-k sparse-teacher KD: the student head in row chunks against a top-k teacher.

``fused_linear_topk_kd_loss(student_hidden, student_weight, topk_indices, topk_logprobs, ...)``
equals :func:`kdengine.llm.topk.topk_kd_loss` on ``student_hidden @ student_weight.T + bias``
without the N x V student logits ever existing whole: it plugs the top-k teacher into the chunk
loop of :mod:`kdengine.llm.fused_linear` (its teacher-source / chunk-loss seam). Per chunk of rows
the head GEMM gives the logits, :func:`~kdengine.llm.topk.topk_kd_rows` gives the row losses and
their gradient in one call, and the gradient goes straight into grad_hidden and the
fp32-accumulated grad_weight / grad_bias. The teacher side is only the (N, k) indices and
log-probabilities (an offline cache, :mod:`kdengine.llm.teacher_cache`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kdengine.llm.fused_linear import (
    check_chunk_size,
    check_student_head,
    fused_linear_chunked,
    loss_denominator,
)
from kdengine.llm.topk import _check_zero_mass, _topk_config, _validate, topk_kd_rows

class _TopKTeacherRows:
    """The teacher source of the chunk loop: slices of the (N, k) indices and log-probs."""

    def __init__(self, indices: Tensor, logprobs: Tensor) -> None:
        self.indices, self.logprobs = indices, logprobs

    def chunk(self, lo: int, hi: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.indices[lo:hi], self.logprobs[lo:hi]


def fused_linear_topk_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    topk_indices: Tensor,
    topk_logprobs: Tensor,
    temperature: float = 1.0,
    *,
    student_bias: Optional[Tensor] = None,
    divergence: str = "forward_kl",
    missing_mass: str = "renormalize",
    reduction: str = "batchmean",
    scale_t2: bool = True,
    labels: Optional[Tensor] = None,
    hard_weight: Optional[float] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    num_items_in_batch: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Top-k KD loss of the student head's logits, computed in row chunks.

    Args:
        student_hidden: ``(..., Hs)`` float32/bfloat16/float16/float64 hidden states.
        student_weight: ``(V, Hs)`` head weight (same dtype); ``student_bias``: ``(V,)`` or None.
        topk_indices: ``(..., k)`` integer token ids of the teacher's top k, distinct per row.
        topk_logprobs: ``(..., k)`` the teacher's log-probabilities of those tokens at
            ``temperature``.
        divergence, missing_mass, reduction, scale_t2, labels, hard_weight, ignore_index,
        label_smoothing: as in :func:`kdengine.llm.topk.topk_kd_loss`.
        num_items_in_batch, chunk_size: as in :func:`kdengine.llm.fused_linear.fused_linear_kd_loss`.

    Returns:
        The loss in ``student_hidden``'s dtype: a scalar, or per row (shape ``...``) for
        ``reduction="none"``. Differentiable in hidden, weight and bias (first order only).
    """
    hs, w, v, lead = check_student_head(student_hidden, student_weight, student_bias)
    cfg = _topk_config(temperature, divergence, missing_mass, reduction, scale_t2, hard_weight,
                       ignore_index, label_smoothing, labels is not None)
    # The top-k checks need only the logits' shape, dtype and device: a zero-stride stand-in.
    proxy = hs.new_zeros(()).expand(*lead, v)
    _, idx, lp, lab = _validate(proxy, topk_indices, topk_logprobs, labels, cfg.ignore_index)
    n, k = math.prod(lead), idx.shape[-1]
    math_dtype = torch.float64 if hs.dtype == torch.float64 else torch.float32
    idx2 = idx.reshape(n, k).contiguous()
    lp2 = lp.reshape(n, k).to(math_dtype).contiguous()
    lab2 = None if lab is None else lab.reshape(n).contiguous()
    _check_zero_mass(lp2, lab2, cfg)

    denom = loss_denominator(reduction, num_items_in_batch, lab2, cfg.ignore_index, n, v)
    per_row = reduction == "none"
    chunk = check_chunk_size(chunk_size, n, v)

    def chunk_loss(s: Tensor, teacher: tuple[Tensor, Tensor], labels_c: Optional[Tensor]):
        rows, grad = topk_kd_rows(s, teacher[0], teacher[1], cfg, labels_c)
        return (rows if per_row else rows.sum()), grad

    out = fused_linear_chunked(hs.reshape(n, hs.shape[-1]), w, student_bias,
                               _TopKTeacherRows(idx2, lp2), chunk_loss, lab2, denom=denom,
                               chunk_size=chunk, per_row=per_row)
    return out.reshape(lead) if per_row else out
