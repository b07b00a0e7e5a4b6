"""LLM-scale distillation: the N x V logits never need to exist whole.

* :func:`fused_linear_kd_loss`, :class:`FusedLinearKDLoss` — fused head GEMM + KD loss in row
  chunks, every :func:`kdengine.kd_loss` option plus ``num_items_in_batch``, ``chunk_size``,
  ``teacher_vocab``;
* :class:`LigerCompatFusedLinearKDLoss`, :func:`liger_fused_linear_kd_loss` — drop-in for Liger's
  chunked distillation losses (weight_hard_loss, weight_soft_loss, beta, chunk_size,
  return_soft_hard_loss, no T^2);
* :func:`topk_kd_loss`, :class:`TopKKDLoss` — a sparse teacher given as top-k indices and
  log-probabilities (renormalize / tail bucket / uniform missing mass), also fused with the head
  (:func:`fused_linear_topk_kd_loss`);
  :mod:`kdengine.llm.teacher_cache` stores such teachers offline;
* :func:`vocab_parallel_kd_loss`, :func:`vocab_parallel_linear_kd_loss` — logits or head sharded
  over the vocabulary across a ``torch.distributed`` process group;
* :mod:`kdengine.llm.hf` — the Hugging Face / TRL integration (optional ``hf`` extra; imported
  on demand so kdengine works without transformers).
"""
from kdengine.llm.fused_linear import FusedLinearKDLoss, auto_chunk_size, fused_linear_kd_loss
from kdengine.llm.fused_topk import fused_linear_topk_kd_loss
from kdengine.llm.liger_compat import LigerCompatFusedLinearKDLoss, liger_fused_linear_kd_loss
from kdengine.llm.teacher_cache import (
    TeacherCache,
    build_teacher_cache,
    bytes_per_token,
    load_teacher_cache,
)
from kdengine.llm.topk import TopKConfig, TopKKDLoss, make_topk_config, retemper_topk, topk_kd_loss, topk_kd_rows
from kdengine.llm.vocab_parallel import vocab_parallel_kd_loss, vocab_parallel_linear_kd_loss

__all__ = [
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "auto_chunk_size",
    "fused_linear_topk_kd_loss",
    "LigerCompatFusedLinearKDLoss",
    "liger_fused_linear_kd_loss",
    "topk_kd_loss",
    "TopKKDLoss",
    "topk_kd_rows",
    "TopKConfig",
    "make_topk_config",
    "retemper_topk",
    "build_teacher_cache",
    "load_teacher_cache",
    "TeacherCache",
    "bytes_per_token",
    "vocab_parallel_kd_loss",
    "vocab_parallel_linear_kd_loss",
]
