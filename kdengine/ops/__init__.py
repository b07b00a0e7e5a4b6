"""Ops: one validating, dispatching entry point per kernel family.

Importing this package registers every backend implementation with :mod:`kdengine._dispatch`.
"""
from kdengine.ops.kd_loss import kd_loss
from kdengine.ops.spiking import if_multistep
from kdengine.ops import kd_backends as _kd_backends  # noqa: F401  (registers kd_loss backends)

__all__ = ["kd_loss", "if_multistep"]
