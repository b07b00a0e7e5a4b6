"""Spiking networks: multi-step layers, ANN -> SNN conversion, running with early exit, latency cuts.

* :mod:`kdengine.snn.layers` — :class:`IFNeuron`, :class:`MultiStep`, :class:`CumulativeMaxPool2d`,
  :class:`IntegrateOutput` (all on ``(T, B, ...)`` tensors, state carried between calls).
* :mod:`kdengine.snn.lif` — :class:`LIFNeuron`, :class:`ParametricLIFNeuron` (leaky neurons,
  learned time constant / threshold) on :func:`kdengine.ops.lif_multistep`.
* :mod:`kdengine.snn.binary` — :class:`SpikingBinaryLinear` / :class:`SpikingBinaryConv2d`:
  spikes x binary weights on the packed AND-popcount kernel.
* :mod:`kdengine.snn.convert` — :func:`convert` (float or binary-weight ReLU nets -> SNN),
  :func:`calibrate`, :func:`fold_batchnorm`, :class:`SpikingNetwork`.
* :mod:`kdengine.snn.run` — :func:`run_snn`, :class:`EarlyExit`, :func:`simulate_early_exit`.
* :mod:`kdengine.snn.latency` — design-time scaling search and early-exit tuning.
* :mod:`kdengine.snn.memory_light` — :class:`SpikingBlock` (synapse + neuron) and its Linear / Conv2d
  variants, trained with memory-light BPTT (input spikes kept as 1 bit, the rest recomputed).
"""
from kdengine.snn.binary import SpikingBinaryConv2d, SpikingBinaryLinear
from kdengine.snn.convert import (
    ENCODINGS,
    NORMALIZATIONS,
    Calibration,
    SpikingNetwork,
    calibrate,
    convert,
    fold_batchnorm,
)
from kdengine.snn.lif import LIFNeuron, ParametricLIFNeuron
from kdengine.snn.latency import ScalingSearch, search_scaling, tune_early_exit
from kdengine.snn import memory_light as _memory_light
from kdengine.snn.memory_light import *  # noqa: F401,F403 - the names of memory_light.__all__
from kdengine.snn import layers as _layers
from kdengine.snn.layers import *  # noqa: F401,F403 - the names of layers.__all__
from kdengine.snn.run import EarlyExit, SNNRun, run_snn, simulate_early_exit

__all__ = [
    *_layers.__all__,
    "LIFNeuron",
    "ParametricLIFNeuron",
    *_memory_light.__all__,
    "SpikingBinaryLinear",
    "SpikingBinaryConv2d",
    "convert",
    "calibrate",
    "Calibration",
    "fold_batchnorm",
    "SpikingNetwork",
    "ENCODINGS",
    "NORMALIZATIONS",
    "EarlyExit",
    "SNNRun",
    "run_snn",
    "simulate_early_exit",
    "search_scaling",
    "ScalingSearch",
    "tune_early_exit",
]
