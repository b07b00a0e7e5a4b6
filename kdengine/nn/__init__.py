"""Binary layers for training, packed layers for inference.

* :class:`BinaryLinear`, :class:`BinaryConv2d` — latent real weights, ``sign`` with the clipped
  straight-through estimator, XNOR-Net per-channel scale; ``mode="weights"`` or ``"both"``.
* :func:`binarize_model` — swap a model's ``nn.Linear`` / ``nn.Conv2d`` for binary ones (first
  and last left in full precision); :func:`clip_latent_weights_` after each optimizer step.
* :func:`pack_model` — inference copy with :class:`PackedBinaryLinear` /
  :class:`PackedBinaryConv2d` (1-bit weights, run by the XNOR-popcount ops); save and load it with
  :func:`kdengine.serialize.save_packed` / :func:`kdengine.serialize.load_packed`.
"""
from kdengine.nn.binary import (
    MODES,
    BinaryConv2d,
    BinaryLinear,
    SignSTE,
    binarize_model,
    binary_layers,
    channel_scale,
    clip_latent_weights_,
    sign_ste,
)
from kdengine.nn.packed import (
    PackedBinaryConv2d,
    PackedBinaryLinear,
    pack_model,
    state_nbytes,
)

# Last: kdengine.snn imports the binary layers above (kdengine.snn.convert), so this must follow them.
from kdengine.snn.layers import IFNeuron, IntegrateOutput, MultiStep  # noqa: E402

__all__ = [
    "MODES",
    "SignSTE",
    "sign_ste",
    "channel_scale",
    "BinaryLinear",
    "BinaryConv2d",
    "binarize_model",
    "binary_layers",
    "clip_latent_weights_",
    "PackedBinaryLinear",
    "PackedBinaryConv2d",
    "pack_model",
    "state_nbytes",
    "IFNeuron",
    "MultiStep",
    "IntegrateOutput",
]
