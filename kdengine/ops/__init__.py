"""Ops: one validating, dispatching entry point per kernel family.

Importing this package registers every backend implementation with :mod:`kdengine._dispatch`.
"""
from kdengine.ops.kd_loss import kd_loss
from kdengine.ops.if_multistep import if_multistep
from kdengine.ops.binary import (
    PackedSigns,
    binary_conv2d,
    binary_linear,
    pack_signs,
    pack_spikes,
    spike_matmul,
    xnor_matmul,
)

__all__ = [
    "kd_loss",
    "if_multistep",
    "PackedSigns",
    "pack_signs",
    "pack_spikes",
    "xnor_matmul",
    "spike_matmul",
    "binary_linear",
    "binary_conv2d",
]
