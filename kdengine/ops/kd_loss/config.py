"""The validated, backend-neutral settings of one kd_loss call.

Every backend receives the same :class:`KDConfig`; the integer values of the enums are what the
native kernels take, so they must not be renumbered.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Divergence(enum.IntEnum):
    FORWARD_KL = 0  # KL(teacher || student), Hinton KD
    REVERSE_KL = 1  # KL(student || teacher)
    JSD = 2  # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q


class Reduction(enum.IntEnum):
    NONE = 0
    SUM = 1
    BATCHMEAN = 2
    MEAN = 3


DIVERGENCE_NAMES = {
    "forward_kl": Divergence.FORWARD_KL,
    "kl": Divergence.FORWARD_KL,
    "reverse_kl": Divergence.REVERSE_KL,
    "jsd": Divergence.JSD,
}
REDUCTION_NAMES = {
    "none": Reduction.NONE,
    "sum": Reduction.SUM,
    "batchmean": Reduction.BATCHMEAN,
    "mean": Reduction.MEAN,
}


@dataclass(frozen=True)
class KDConfig:
    """Settings after validation. ``temperature`` may be ``math.inf`` (the exact T -> inf limit)."""

    temperature: float = 1.0
    scale_t2: bool = True
    divergence: Divergence = Divergence.FORWARD_KL
    beta: float = 0.5
    hard_weight: float = 0.0
    ignore_index: int = -100
    label_smoothing: float = 0.0
    reduction: Reduction = Reduction.BATCHMEAN
    need_teacher_grad: bool = False

    @property
    def kd_coef(self) -> float:
        """Multiplier of the divergence D inside the loss: T^2 (or 1), times (1 - alpha)."""
        import math

        t = self.temperature
        c = 1.0 if (math.isinf(t) or not self.scale_t2) else t * t
        return c * (1.0 - self.hard_weight)
