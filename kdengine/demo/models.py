"""The demo's three networks, built from the experiments' model builders (not copied).

* teacher: :func:`kdengine.experiments.binary_mnist.vgg_relu` (float VGG-style CNN, max pooling
  before the ReLU, dropout), wider than the students.
* XNOR student: :func:`kdengine.experiments.binary_mnist.vgg_bn_sign` through
  :func:`kdengine.nn.binarize_model` ``mode="both"``: binary weights *and* activations in the
  middle convolutions and the hidden fc (BatchNorm before each, whose sign is the nonlinearity),
  first conv and last fc full precision. This is the network the XNOR-popcount runtime and the
  crossbar run: a crossbar row is driven by +-1 inputs, which only ``mode="both"`` layers have.
* SNN student: :func:`kdengine.experiments.snn_mnist.snn_cnn` through ``binarize_model``
  ``mode="weights"``: binary weights, ReLU activations (no bias, no BN, average pooling before the
  ReLU), first conv and last fc full precision. ANN -> SNN conversion needs ReLUs (a rate code
  stands for a non-negative activation), which is why the spiking path has its own student: the
  ``sign`` nonlinearity of the XNOR student has no rate-coded equivalent.
"""
from __future__ import annotations

import torch
from torch import nn

from kdengine.experiments.binary_mnist import vgg_bn_sign, vgg_relu
from kdengine.experiments.snn_mnist import snn_cnn
from kdengine.nn import binarize_model

__all__ = ["teacher_net", "xnor_student", "xnor_student_float", "snn_student", "snn_student_float"]


def teacher_net(width: int, hidden: int, seed: int) -> nn.Sequential:
    """Float teacher CNN (seeded initialisation)."""
    torch.manual_seed(seed)
    return vgg_relu(width, hidden)


def xnor_student_float(width: int, hidden: int, seed: int) -> nn.Sequential:
    """The XNOR student's architecture with fp32 Conv2d/Linear layers (latency reference)."""
    torch.manual_seed(seed)
    return vgg_bn_sign(width, hidden)


def xnor_student(width: int, hidden: int, seed: int) -> nn.Module:
    """Binary weights and activations (``mode="both"``), first/last layer full precision."""
    return binarize_model(xnor_student_float(width, hidden, seed), mode="both")


def snn_student_float(width: int, hidden: int, seed: int) -> nn.Sequential:
    """The SNN student's architecture with fp32 layers (latency reference)."""
    torch.manual_seed(seed)
    return snn_cnn(width, hidden)


def snn_student(width: int, hidden: int, seed: int) -> nn.Module:
    """Binary weights, ReLU activations (``mode="weights"``), first/last layer full precision."""
    return binarize_model(snn_student_float(width, hidden, seed), mode="weights")
