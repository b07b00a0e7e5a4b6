"""kd_loss: the fused temperature softmax-KL (+ hard-label CE) distillation loss.

``op`` holds the validating entry point and its torch.library op with the autograd formula,
``config`` the kernel configuration, ``reference`` the float64 specification, ``triton_kernel``
the Triton kernels and ``backends`` the per-backend registrations (C++/CUDA kernels:
``kdengine/csrc/kd_loss/``).
"""
from kdengine.ops.kd_loss.config import Divergence, KDConfig, Reduction  # noqa: F401  (re-exported)
from kdengine.ops.kd_loss.op import (  # noqa: F401  (re-exported)
    FLOAT_DTYPES,
    _check_float,
    _check_logits,
    check_hard_ce,
    kd_loss,
    make_config,
)
from kdengine.ops.kd_loss import backends as _backends  # noqa: F401  (registers every backend)

__all__ = ["kd_loss", "make_config", "check_hard_ce", "FLOAT_DTYPES", "KDConfig", "Divergence",
           "Reduction"]
