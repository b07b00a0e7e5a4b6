"""Reference (pure torch) multi-step integrate-and-fire neuron: the spec every backend must match.

A plain step loop over T with autograd; the only hand-written derivatives are the two that the
spec defines rather than derives (the surrogate of the Heaviside step, and the hard-reset select).

Per neuron, state ``v`` (float32; float64 when x is float64), for t = 0 .. T-1::

    h_t = v_{t-1} + x_t                          charge   (v_{-1} = v_init; default v_reset, or 0
                                                           for the soft reset, as SpikingJelly)
    s_t = H(h_t - theta)                         fire     H(u) = 1 if u >= 0 else 0; NaN if h_t is NaN
    v_t = h_t - s_t * theta                      soft reset (v_reset=None)
    v_t = v_reset if s_t else h_t                hard reset

Backward (what autograd of this loop computes): ``dH/du`` is replaced by the surrogate derivative

    atan:     sg(u) = (alpha / 2) / (1 + (pi / 2 * alpha * u)^2)                 (default alpha 2)
    sigmoid:  sg(u) = alpha * sigma(alpha u) * (1 - sigma(alpha u))              (default alpha 4)

and the reset contributes ``dv_t/dh_t`` = ``1 - theta * sg`` (soft) or
``(1 - s_t) + (v_reset - h_t) * sg`` (hard), with the ``sg`` term dropped when ``detach_reset``
(the reset sees ``s_t.detach()``). These are SpikingJelly's ``IFNode(step_mode="m")`` semantics
(``neuronal_charge``, ``neuronal_fire = surrogate(v - v_threshold)``, soft/hard ``voltage_reset``),
except two corner cases where the spec is deliberately different: a NaN potential emits a NaN
spike (SpikingJelly emits 0: NaN in -> NaN out here), and a hard reset of an infinite potential
gives ``v_reset`` (SpikingJelly's ``s * v_reset + (1 - s) * h`` gives NaN).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

SURROGATES = ("atan", "sigmoid")
DEFAULT_ALPHA = {"atan": 2.0, "sigmoid": 4.0}


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the membrane potential and of all math: float64 for float64 input, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def surrogate_grad(u: Tensor, surrogate: str, alpha: float) -> Tensor:
    """d spike / d u used by backward, at ``u = h - theta`` (same dtype as ``u``).

    The sigmoid form ``alpha e / (1 + e)^2`` with ``e = exp(-alpha |u|)`` equals
    ``alpha sigma (1 - sigma)`` but has no cancellation in ``1 - sigma`` for large ``alpha u``.
    """
    if surrogate == "atan":
        z = u * (math.pi / 2 * alpha)
        return (alpha / 2) / (1 + z * z)
    if surrogate == "sigmoid":
        e = torch.exp(-alpha * u.abs())
        return alpha * e / ((1 + e) * (1 + e))
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


def surrogate_primitive(u: Tensor, surrogate: str, alpha: float) -> Tensor:
    """A smooth function whose derivative is :func:`surrogate_grad` (tests gradcheck against it)."""
    if surrogate == "atan":
        return torch.atan(u * (math.pi / 2 * alpha)) / math.pi + 0.5
    if surrogate == "sigmoid":
        return torch.sigmoid(alpha * u)
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


def heaviside(u: Tensor) -> Tensor:
    """1 where u >= 0, 0 where u < 0, NaN where u is NaN (a comparison alone would give 0)."""
    s = (u >= 0).to(u.dtype)
    return torch.where(torch.isnan(u), u, s)


class SurrogateSpike(torch.autograd.Function):
    """Forward: the Heaviside step of ``u``; backward: ``grad * surrogate_grad(u)``.

    The backward is made of differentiable torch ops, so higher derivatives (``create_graph=True``,
    HVPs, gradient penalties) are those of the surrogate formula: d/du of ``g * sg(u)`` is
    ``g * sg'(u)``. ``setup_context`` style, so ``torch.func`` transforms work too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, surrogate: str, alpha: float) -> Tensor:
        return heaviside(u)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        u, surrogate, alpha = inputs
        ctx.save_for_backward(u)
        ctx.surrogate, ctx.alpha = surrogate, alpha

    @staticmethod
    def backward(ctx, g: Tensor):
        (u,) = ctx.saved_tensors
        return g * surrogate_grad(u, ctx.surrogate, ctx.alpha), None, None


class HardReset(torch.autograd.Function):
    """``v_reset if s else h`` in value; the derivative of ``s * v_reset + (1 - s) * h`` in
    backward (d/dh = 1 - s, d/ds = v_reset - h). The select keeps an infinite ``h`` from turning
    into NaN through ``0 * inf``. The backward is differentiable (double backward: the
    derivatives of that product form)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: Tensor, s: Tensor, v_reset: float) -> Tensor:
        return torch.where(s == 1, torch.full_like(h, v_reset), h)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        h, s, v_reset = inputs
        ctx.save_for_backward(h, s)
        ctx.v_reset = v_reset

    @staticmethod
    def backward(ctx, g: Tensor):
        h, s = ctx.saved_tensors
        gh = g * (1 - s) if ctx.needs_input_grad[0] else None
        gs = g * (ctx.v_reset - h) if ctx.needs_input_grad[1] else None
        return gh, gs, None


def if_multistep_reference(
    x: Tensor,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = None,
    v_init: Optional[Tensor] = None,
    surrogate: str = "atan",
    alpha: Optional[float] = None,
    detach_reset: bool = False,
) -> tuple[Tensor, Tensor]:
    """The multi-step IF neuron as a step loop (inputs already validated by the entry point).

    Args:
        x: ``(T, ...)`` floating input currents, T >= 1.
        v_threshold: theta > 0. v_reset: None (soft reset) or the hard-reset potential.
        v_init: ``(...)`` initial potential (any floating dtype; cast to the state dtype), or None
            for the resting potential (``v_reset``, or 0 with the soft reset).
        surrogate, alpha, detach_reset: as in :func:`kdengine.ops.if_multistep`.

    Returns:
        ``(spikes, v_final)``: spikes ``(T, ...)`` in x's dtype, the final potential ``(...)`` in
        the state dtype (:func:`state_dtype`). Differentiable in ``x`` and ``v_init``.
    """
    if alpha is None:
        alpha = DEFAULT_ALPHA[surrogate]
    sd = state_dtype(x.dtype)
    xs = x.to(sd)
    if v_init is None:  # SpikingJelly's resting potential: v_reset for hard reset, else 0
        v = torch.full(x.shape[1:], 0.0 if v_reset is None else float(v_reset), dtype=sd,
                       device=x.device)
    else:
        v = v_init.to(sd)
    spikes = []
    for t in range(x.shape[0]):
        h = v + xs[t]
        s = SurrogateSpike.apply(h - v_threshold, surrogate, float(alpha))
        s_r = s.detach() if detach_reset else s
        if v_reset is None:
            v = h - s_r * v_threshold
        else:
            v = HardReset.apply(h, s_r, float(v_reset))
        spikes.append(s)
    return torch.stack(spikes).to(x.dtype), v
