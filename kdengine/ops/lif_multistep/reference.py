"""The multi-step leaky integrate-and-fire neuron as a step loop: the specification.

Per neuron, with the state (membrane potential v) in fp32 (float64 for float64 input), starting
from ``v_init`` or the resting potential ``v_rest`` (``v_reset`` for the hard reset, else 0) and
``r = v_reset`` for the hard reset, 0 for the reset by subtraction (SpikingJelly's convention):

    charge, with the leak written either through the time constant tau ("divide") or through the
    decay factor k = 1/tau ("multiply"; the parametric neuron learns k = sigmoid(w)):
        decay_input:      h_t = v_{t-1} + (x_t - (v_{t-1} - r)) / tau   |  ... * k
        not decay_input:  h_t = v_{t-1} - (v_{t-1} - r) / tau + x_t     |  ... * k + x_t
    fire:   s_t = H(h_t - theta)                  (1 at h_t >= theta; NaN if h_t - theta is NaN)
    reset:  v_t = h_t - s_t * theta               (soft, v_reset=None)
            v_t = v_reset if s_t else h_t         (hard)

The operations and their order are SpikingJelly's ``LIFNode`` (divide) and ``ParametricLIFNode``
(multiply) torch code, so the spikes agree bit for bit in the same state dtype.

Backward: autograd of this loop, with dH/du replaced by the surrogate derivative (atan / sigmoid,
:func:`kdengine.ops.if_multistep.reference.surrogate_grad`) and the reset's ``sg`` term dropped
with ``detach_reset``. ``tau`` (or ``k``) and ``theta`` may be tensors: their gradients are those
of this loop too (sums over neurons and steps).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from kdengine.ops.if_multistep.reference import (
    DEFAULT_ALPHA,
    HardReset,
    SurrogateSpike,
    state_dtype,
)

Scalar = Union[float, Tensor]


def charge(v: Tensor, x: Tensor, leak: Scalar, r: float, decay_input: bool, divide: bool) -> Tensor:
    """``h`` from the previous potential ``v`` and the input ``x`` (both in the state dtype)."""
    if decay_input:
        a = x - (v - r)
        return v + (a / leak if divide else a * leak)
    d = v - r
    return v - (d / leak if divide else d * leak) + x


def lif_multistep_reference(
    x: Tensor,
    leak: Scalar = 2.0,
    v_threshold: Scalar = 1.0,
    v_reset: Optional[float] = None,
    v_init: Optional[Tensor] = None,
    surrogate: str = "atan",
    alpha: Optional[float] = None,
    detach_reset: bool = False,
    *,
    decay_input: bool = True,
    divide: bool = True,
) -> tuple[Tensor, Tensor]:
    """The multi-step LIF neuron as a step loop (inputs already validated by the entry point).

    Args:
        x: ``(T, ...)`` floating input currents, T >= 1.
        leak: tau (``divide=True``) or the decay factor k = 1/tau (``divide=False``): a float or a
            0-dim tensor in the state dtype (differentiable).
        v_threshold: theta, a float or a 0-dim tensor in the state dtype (differentiable).
        v_reset: None (reset by subtraction) or the hard-reset potential.
        v_init: ``(...)`` initial potential, or None for the resting potential.
        surrogate, alpha, detach_reset: as in :func:`kdengine.ops.lif_multistep`.
        decay_input, divide: the charge equation (module doc).

    Returns:
        ``(spikes, v_final)``: spikes ``(T, ...)`` in x's dtype, the final potential ``(...)`` in
        the state dtype. Differentiable in ``x``, ``v_init``, ``leak`` and ``v_threshold``.
    """
    if alpha is None:
        alpha = DEFAULT_ALPHA[surrogate]
    sd = state_dtype(x.dtype)
    xs = x.to(sd)
    r = 0.0 if v_reset is None else float(v_reset)
    if v_init is None:
        v = torch.full(x.shape[1:], r, dtype=sd, device=x.device)
    else:
        v = v_init.to(sd)
    spikes = []
    for t in range(x.shape[0]):
        h = charge(v, xs[t], leak, r, decay_input, divide)
        s = SurrogateSpike.apply(h - v_threshold, surrogate, float(alpha))
        s_r = s.detach() if detach_reset else s
        if v_reset is None:
            v = h - s_r * v_threshold
        else:
            v = HardReset.apply(h, s_r, r)
        spikes.append(s)
    return torch.stack(spikes).to(x.dtype), v
