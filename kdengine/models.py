"""The networks of the demo and the reproductions, one definition each (MNIST-sized, 1 x 28 x 28).

Float builders return plain ``nn.Sequential`` stacks; the binary variants go through
:func:`kdengine.nn.binarize_model`. Module positions inside each ``nn.Sequential`` are part of the
contract: the reproductions tap features by index (e.g. ``"5"`` of :func:`small_cnn` is the pool
closing the second conv stage), so a change of layer order here changes what they measure.

* :func:`mlp`, :func:`small_cnn`: the students and teachers of the paper reproductions.
* :func:`vgg_relu`: a VGG-style CNN in the style of docs/papers.md section 3 (Lu & Sengupta 2020):
  3x3 convolutions without bias, max pooling *before* the ReLU, no BatchNorm, dropout before the
  classifier layers. The demo's teacher; with ``binarize_model(mode="weights")`` a binary-weight net.
* :func:`vgg_bn_sign`: the skeleton of a binary-activation (``mode="both"``) net. ``sign(relu(x))``
  would be +1 everywhere, so each binary layer's input comes from ``pool -> BatchNorm`` and the
  layer's own ``sign`` is the nonlinearity (BinaryNet / XNOR-Net).
* :func:`snn_cnn`: the ANN of an ANN -> SNN conversion: no bias, no BN, dropout, *average* pooling
  before the ReLU (a rate code stands for a non-negative activation, and average pooling of rates
  is exact where max pooling is not).
* :class:`ConvSNN`: a spiking CNN trained through time with surrogate gradients (conv-BN-neuron
  twice, pool, linear-neuron, readout of the mean spike count), on :mod:`kdengine.snn.memory_light`
  blocks; the neuron is a parameter (kdengine's IF, a LIF / PLIF, SpikingJelly's nodes).
* :func:`binary_mlp`: hidden layers with binary weights and activations (the crossbar net).
* :func:`teacher_net`, :func:`xnor_student`, :func:`snn_student` (and the ``*_float`` latency
  references): the demo's seeded networks.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "mlp", "small_cnn", "vgg_relu", "vgg_bn_sign", "snn_cnn", "ConvSNN", "default_snn_neuron", "binary_mlp",
    "logit_layer", "n_params",
    "teacher_net", "xnor_student", "xnor_student_float", "snn_student", "snn_student_float",
]

# one conv stage: (in_channels, out_channels) -> modules; the nets differ only in the stage recipe
Stage = Callable[[int, int], list]


def _conv3x3(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


def _stages(in_channels: int, channels: Sequence[int], stage: Stage) -> list[nn.Module]:
    layers: list[nn.Module] = []
    c = in_channels
    for ch in channels:
        layers += stage(c, ch)
        c = ch
    return layers


def _dropout_head(features: int, hidden: int, n_classes: int, dropout: float) -> list[nn.Module]:
    """``Flatten Dropout | Linear(hidden) ReLU Dropout | Linear(n_classes)``, no biases."""
    return [nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(features, hidden, bias=False), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, n_classes, bias=False)]


def mlp(in_dim: int, hidden: Sequence[int], n_classes: int, *, dropout: float = 0.0) -> nn.Sequential:
    """Flatten -> [Linear -> ReLU (-> Dropout)] * len(hidden) -> Linear(n_classes) (the logit
    layer, last)."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    layers.append(nn.Linear(d, n_classes))
    return nn.Sequential(*layers)


def small_cnn(n_classes: int = 10, channels: Sequence[int] = (8, 16), hidden: int = 64,
              in_channels: int = 1, image_size: int = 28) -> nn.Sequential:
    """[Conv3x3 (bias) -> ReLU -> MaxPool2] per entry of ``channels``, then
    Flatten -> Linear(hidden) -> ReLU -> Linear(n_classes) (the logit layer, last)."""
    layers = _stages(in_channels, channels,
                     lambda c, ch: [_conv3x3(c, ch, bias=True), nn.ReLU(), nn.MaxPool2d(2)])
    s = image_size // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(channels[-1] * s * s, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)]
    return nn.Sequential(*layers)


def vgg_relu(width: int = 16, hidden: int = 128, dropout: float = 0.2) -> nn.Sequential:
    """``conv(1->w) maxpool relu | conv(w->2w) maxpool relu | conv(2w->2w) maxpool relu |
    flatten dropout fc(2w*9->hidden) relu dropout | fc(hidden->10)``, no biases (28 -> 14 -> 7 -> 3)."""
    c1, c2 = width, 2 * width
    layers = _stages(1, (c1, c2, c2), lambda c, ch: [_conv3x3(c, ch), nn.MaxPool2d(2), nn.ReLU()])
    return nn.Sequential(*layers, *_dropout_head(c2 * 9, hidden, 10, dropout))


def vgg_bn_sign(width: int = 16, hidden: int = 128) -> nn.Sequential:
    """``conv(1->w) maxpool bn | conv(w->2w) maxpool bn | conv(2w->2w) maxpool bn | flatten
    fc(2w*9->hidden) bn1d | fc(hidden->10)``, no biases: BatchNorm before every layer that
    ``binarize_model(mode="both")`` makes binary, whose ``sign`` is the nonlinearity."""
    c1, c2 = width, 2 * width
    layers = _stages(1, (c1, c2, c2), lambda c, ch: [_conv3x3(c, ch), nn.MaxPool2d(2), nn.BatchNorm2d(ch)])
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c2 * 9, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.Linear(hidden, 10, bias=False))


def snn_cnn(width: int = 8, hidden: int = 64, dropout: float = 0.2) -> nn.Sequential:
    """``conv(1->w) avgpool relu | conv(w->2w) avgpool relu | flatten dropout fc(2w*49->hidden)
    relu dropout | fc(hidden->10)``, no biases, no BN (28 -> 14 -> 7)."""
    c1, c2 = width, 2 * width
    layers = _stages(1, (c1, c2), lambda c, ch: [_conv3x3(c, ch), nn.AvgPool2d(2), nn.ReLU()])
    return nn.Sequential(*layers, *_dropout_head(c2 * 49, hidden, 10, dropout))


def default_snn_neuron() -> nn.Module:
    """kdengine's fused IF neuron with SpikingJelly's ``IFNode`` defaults: threshold 1, hard reset
    to 0, atan surrogate (alpha 2), reset not detached."""
    from kdengine.snn import IFNeuron

    return IFNeuron(1.0, 0.0, surrogate="atan", alpha=2.0)


class ConvSNN(nn.Module):
    """A spiking CNN for 1 x 28 x 28 images, trained through time (BPTT, surrogate gradients).

    ``conv(1->c1) BN neuron`` (direct encoding: the image is the input current at every step, the
    conv runs once) ``| maxpool conv(c1->c2) BN neuron | maxpool flatten fc(c2*49->hidden) neuron |
    fc(hidden->n_classes)`` on the mean spike count over the ``time_steps`` steps (the logits).
    28 -> 28 -> 14 -> 7. The three spiking layers are :class:`kdengine.snn.SpikingBlock` s, so
    ``memory_light=True`` trains with 1-bit saved spikes (same gradients, less memory, one more
    forward per layer in the backward).

    ``neuron``: a factory called once per spiking layer, returning a multi-step neuron module
    (default :func:`default_snn_neuron`); its state is reset at every ``forward`` (each input is a
    new sequence): a module with a ``reset()`` method (kdengine's, SpikingJelly's) is reset with it.
    """

    def __init__(self, neuron: Callable[[], nn.Module] | None = None, *, channels: Sequence[int] = (8, 16),
                 hidden: int = 64, time_steps: int = 4, n_classes: int = 10, memory_light: bool = False) -> None:
        super().__init__()
        from kdengine.snn import SpikingBlock, SpikingConvBlock

        make = neuron or default_snn_neuron
        c1, c2 = channels
        self.time_steps = int(time_steps)
        self.conv1 = SpikingConvBlock(1, c1, 3, make(), padding=1, bias=False, batch_norm=True,
                                      time_steps=self.time_steps)
        self.conv2 = SpikingConvBlock(c1, c2, 3, make(), padding=1, bias=False, batch_norm=True, pool=2)
        self.fc = SpikingBlock(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 49, hidden)), make())
        self.readout = nn.Linear(hidden, n_classes)
        self.set_memory_light(memory_light)

    def blocks(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.fc]

    def set_memory_light(self, on: bool) -> "ConvSNN":
        """Train with memory-light BPTT (True) or plain autograd (False); same parameters."""
        for b in self.blocks():
            b.memory_light = bool(on)
        return self

    def reset(self) -> None:
        """Reset every neuron's state."""
        for b in self.blocks():
            reset = getattr(b.neuron, "reset", None)
            if callable(reset):
                reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 1, 28, 28)`` images -> ``(B, n_classes)`` logits."""
        self.reset()
        s = self.fc(self.conv2(self.conv1(x)))
        return self.readout(s.mean(0))


def binary_mlp(hidden: int = 512) -> nn.Module:
    """``Flatten | Linear(784, H) BN | BinaryLinear(H, H) BN | BinaryLinear(H, H) BN | Linear(H, 10)``:
    binary weights and activations in the hidden layers (``mode="both"``), first and last layer
    full precision."""
    from kdengine.nn import binarize_model

    skeleton = nn.Sequential(
        nn.Flatten(), nn.Linear(784, hidden), nn.BatchNorm1d(hidden),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
        nn.Linear(hidden, 10),
    )
    return binarize_model(skeleton, mode="both")


def logit_layer(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` in module registration order: the logit layer."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear logit layer")
    return last


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the demo's networks


def teacher_net(width: int, hidden: int, seed: int) -> nn.Sequential:
    """Float teacher CNN (:func:`vgg_relu`, seeded initialisation)."""
    torch.manual_seed(seed)
    return vgg_relu(width, hidden)


def xnor_student_float(width: int, hidden: int, seed: int) -> nn.Sequential:
    """The XNOR student's architecture with fp32 Conv2d/Linear layers (latency reference)."""
    torch.manual_seed(seed)
    return vgg_bn_sign(width, hidden)


def xnor_student(width: int, hidden: int, seed: int) -> nn.Module:
    """Binary weights and activations (``mode="both"``), first/last layer full precision: the net
    the XNOR-popcount runtime and the crossbar run (a crossbar row is driven by +-1 inputs)."""
    from kdengine.nn import binarize_model

    return binarize_model(xnor_student_float(width, hidden, seed), mode="both")


def snn_student_float(width: int, hidden: int, seed: int) -> nn.Sequential:
    """The SNN student's architecture with fp32 layers (latency reference)."""
    torch.manual_seed(seed)
    return snn_cnn(width, hidden)


def snn_student(width: int, hidden: int, seed: int) -> nn.Module:
    """Binary weights, ReLU activations (``mode="weights"``), first/last layer full precision. The
    spiking path has its own student because conversion needs ReLUs: the ``sign`` nonlinearity of
    the XNOR student has no rate-coded equivalent."""
    from kdengine.nn import binarize_model

    return binarize_model(snn_student_float(width, hidden, seed), mode="weights")
