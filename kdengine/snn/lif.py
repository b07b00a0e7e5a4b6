"""Multi-step leaky integrate-and-fire layers on :func:`kdengine.ops.lif_multistep`.

* :class:`LIFNeuron` — LIF neurons with a fixed time constant (SpikingJelly's ``LIFNode``).
* :class:`ParametricLIFNeuron` — LIF neurons with a learned time constant, ``1/tau =
  sigmoid(w)`` (SpikingJelly's ``ParametricLIFNode``, Fang et al. 2021), and optionally a learned
  threshold.

Both take ``(T, B, ...)`` inputs, carry the membrane potential between calls and follow the state
protocol of :class:`kdengine.snn.layers.Stateful` (``reset()``, ``keep(index)``), like
:class:`kdengine.snn.layers.IFNeuron`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from kdengine.ops.lif_multistep import lif_multistep
from kdengine.snn.layers import IFNeuron

__all__ = ["LIFNeuron", "ParametricLIFNeuron"]


class LIFNeuron(IFNeuron):
    """Multi-step leaky integrate-and-fire neurons, state carried between calls.

    ``forward(x)``: ``x`` ``(T, B, ...)`` input currents -> spikes ``(T, B, ...)`` (0/1, x's
    dtype); per step ``h = v + (x - (v - r)) / tau`` (``decay_input``, else ``h = v - (v - r) / tau
    + x``), with ``r = v_reset`` or 0, then fire and reset as :class:`IFNeuron`.

    Args:
        tau: membrane time constant, >= 1 (default 2.0).
        decay_input: whether the input is scaled by ``1/tau`` too (default True).
        v_threshold, v_reset, init_potential, surrogate, alpha, detach_reset, backend,
            count_spikes: as in :class:`IFNeuron` (reset by subtraction by default; SpikingJelly's
            LIFNode defaults to a hard reset at 0: pass ``v_reset=0.0``).
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: Optional[float] = None,
        *,
        decay_input: bool = True,
        init_potential: float = 0.0,
        surrogate: str = "atan",
        alpha: Optional[float] = None,
        detach_reset: bool = False,
        backend: Optional[str] = None,
        count_spikes: bool = False,
    ) -> None:
        super().__init__(v_threshold, v_reset, init_potential=init_potential, surrogate=surrogate,
                         alpha=alpha, detach_reset=detach_reset, backend=backend,
                         count_spikes=count_spikes)
        tau = float(tau)
        if not (math.isfinite(tau) and tau >= 1.0):
            raise ValueError(f"tau must be finite and >= 1, got {tau}")
        self.tau = tau
        self.decay_input = bool(decay_input)

    def _fire(self, x: Tensor, v0: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return lif_multistep(x, self.tau, self.v_threshold, self.v_reset, decay_input=self.decay_input,
                             v_init=v0, return_v=True, surrogate=self.surrogate, alpha=self.alpha,
                             detach_reset=self.detach_reset, backend=self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}, decay_input={self.decay_input}, " + super().extra_repr()


class ParametricLIFNeuron(IFNeuron):
    """LIF neurons with a learned time constant: ``1/tau = sigmoid(w)``, ``w`` a scalar parameter
    initialised to ``-log(init_tau - 1)`` (SpikingJelly's ``ParametricLIFNode``); with
    ``learn_threshold`` the threshold is a scalar parameter too (``self.threshold``).

    The leak is applied as ``* sigmoid(w)`` (not ``/ tau``), as SpikingJelly does, so spikes match
    its ParametricLIFNode bit for bit. Other arguments: as in :class:`LIFNeuron`.
    """

    def __init__(
        self,
        init_tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: Optional[float] = None,
        *,
        learn_threshold: bool = False,
        decay_input: bool = True,
        init_potential: float = 0.0,
        surrogate: str = "atan",
        alpha: Optional[float] = None,
        detach_reset: bool = False,
        backend: Optional[str] = None,
        count_spikes: bool = False,
    ) -> None:
        super().__init__(v_threshold, v_reset, init_potential=init_potential, surrogate=surrogate,
                         alpha=alpha, detach_reset=detach_reset, backend=backend,
                         count_spikes=count_spikes)
        init_tau = float(init_tau)
        if not (math.isfinite(init_tau) and init_tau > 1.0):
            raise ValueError(f"init_tau must be finite and > 1 (1/tau = sigmoid(w)), got {init_tau}")
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))
        self.decay_input = bool(decay_input)
        self.threshold = nn.Parameter(torch.tensor(self.v_threshold)) if learn_threshold else None

    @property
    def tau(self) -> float:
        """The current time constant ``1 / sigmoid(w)``."""
        return float(1.0 / torch.sigmoid(self.w.detach()))

    def _threshold_value(self) -> float:
        return self.v_threshold if self.threshold is None else float(self.threshold.detach())

    def _fire(self, x: Tensor, v0: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        # sigmoid in the state dtype (fp32 unless x is float64), as SpikingJelly's w.float().sigmoid()
        w = self.w if x.dtype == torch.float64 else self.w.float()
        thr = self.v_threshold if self.threshold is None else self.threshold
        return lif_multistep(x, None, thr, self.v_reset, decay=torch.sigmoid(w),
                             decay_input=self.decay_input, v_init=v0, return_v=True,
                             surrogate=self.surrogate, alpha=self.alpha,
                             detach_reset=self.detach_reset, backend=self.backend)

    def extra_repr(self) -> str:
        learned = ", learned threshold" if self.threshold is not None else ""
        return f"tau={self.tau:.4g} (learned){learned}, decay_input={self.decay_input}, " + super().extra_repr()
