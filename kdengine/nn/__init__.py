"""Binary layers for training, packed layers for inference.

* :class:`BinaryLinear`, :class:`BinaryConv2d` — latent real weights, ``sign`` with the clipped
  straight-through estimator, XNOR-Net per-channel scale; ``mode="weights"`` or ``"both"``.
* :func:`binarize_model` — swap a model's ``nn.Linear`` / ``nn.Conv2d`` for binary ones (first
  and last left in full precision); :func:`clip_latent_weights_` after each optimizer step.
* :func:`pack_model` — inference copy with :class:`PackedBinaryLinear` /
  :class:`PackedBinaryConv2d` (1-bit weights, run by the XNOR-popcount ops); save and load it with
  :func:`kdengine.serialize.save_packed` / :func:`kdengine.serialize.load_packed`. Their ``forward``
  and :mod:`kdengine.infer` run the same :class:`LayerPlan` (``layer.inference_plan(x)``, :mod:`kdengine.nn.plan`).
* :class:`BinaryMaxPool2d` — max-pool on floats or on packed channel words (AND of the words).
* ``IFNeuron``, ``MultiStep``, ``IntegrateOutput``: the spiking layers of :mod:`kdengine.snn.layers`.
"""
from kdengine.nn import binary as _binary
from kdengine.nn.binary import *  # noqa: F401,F403 - the names of binary.__all__
from kdengine.nn.packed import (
    PackedBinaryConv2d,
    PackedBinaryLinear,
    pack_model,
    state_nbytes,
)
from kdengine.nn.plan import LayerPlan
from kdengine.nn.pool import BinaryMaxPool2d

# The multi-step spiking layers live in kdengine.snn, which builds on this package: they are
# resolved on first access, so importing kdengine.nn never imports kdengine.snn (no import cycle).
_SPIKING = ("IFNeuron", "MultiStep", "IntegrateOutput")


def __getattr__(name: str):
    if name in _SPIKING:
        from kdengine.snn import layers

        return getattr(layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_binary.__all__,
    "PackedBinaryLinear",
    "PackedBinaryConv2d",
    "pack_model",
    "state_nbytes",
    "LayerPlan",
    "BinaryMaxPool2d",
    *_SPIKING,
]
