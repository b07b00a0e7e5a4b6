"""LLM-scale distillation: fused linear head + KD loss (the N x V logits never exist).

* :func:`fused_linear_kd_loss`, :class:`FusedLinearKDLoss` — kdengine's own surface, every
  :func:`kdengine.kd_loss` option plus ``num_items_in_batch``, ``chunk_size``, ``teacher_vocab``;
* :class:`LigerCompatFusedLinearKDLoss`, :func:`liger_fused_linear_kd_loss` — drop-in for Liger's
  chunked distillation losses (weight_hard_loss, weight_soft_loss, beta, chunk_size,
  return_soft_hard_loss, no T^2).
"""
from kdengine.llm.fused_linear import FusedLinearKDLoss, auto_chunk_size, fused_linear_kd_loss
from kdengine.llm.liger_compat import LigerCompatFusedLinearKDLoss, liger_fused_linear_kd_loss

__all__ = [
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "auto_chunk_size",
    "LigerCompatFusedLinearKDLoss",
    "liger_fused_linear_kd_loss",
]
