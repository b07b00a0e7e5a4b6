"""Ops: one validating, dispatching entry point per kernel family.

Importing this package registers every backend implementation with :mod:`kdengine._dispatch`.
"""
from kdengine.ops.kd_loss import kd_loss
from kdengine.ops.if_multistep import if_multistep
from kdengine.ops.lif_multistep import lif_multistep
from kdengine.ops import binary as _binary
# The binary family's public names are listed once, in its own __all__.
from kdengine.ops.binary import *  # noqa: F403

__all__ = ["kd_loss", "if_multistep", "lif_multistep", *_binary.__all__]
