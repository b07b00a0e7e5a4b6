"""kdengine: fused kernels for knowledge distillation, binary and spiking neural networks.

Public API (stable names; see DESIGN in the README):

* :func:`kd_loss`, :class:`KDLoss` — fused temperature softmax-KL (+ hard-label CE)
* :func:`logits_matching_loss`, :func:`equal_mean_init_` — the T -> inf story
* :mod:`kdengine.ops` — the ops, one entry point each
* :func:`fused_linear_kd_loss`, :class:`FusedLinearKDLoss`, :func:`topk_kd_loss` — LLM-scale KD
  (the head fused with the loss in row chunks; top-k sparse teachers); more in :mod:`kdengine.llm`
* :func:`backends` — which backend can run each op here, and why not
* :class:`BackendFallbackWarning` — warned once when ``backend="auto"`` cannot use the fastest
  backend for the device (a missing compiler, say) and runs a slower one
"""
from kdengine._dispatch import BackendFallbackWarning, backends
from kdengine.losses import KDLoss, equal_mean_init_, logits_matching_loss
from kdengine.ops import kd_loss
from kdengine.llm import FusedLinearKDLoss, fused_linear_kd_loss, topk_kd_loss
from kdengine import ops

__version__ = "0.1.0"

__all__ = [
    "kd_loss",
    "KDLoss",
    "logits_matching_loss",
    "equal_mean_init_",
    "backends",
    "fused_linear_kd_loss",
    "FusedLinearKDLoss",
    "topk_kd_loss",
    "BackendFallbackWarning",
    "ops",
    "__version__",
]
