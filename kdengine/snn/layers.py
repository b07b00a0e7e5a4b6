"""Multi-step spiking layers: every module takes and returns ``(T, B, ...)`` tensors.

* :class:`IFNeuron` — integrate-and-fire neurons on :func:`kdengine.ops.spiking.if_multistep`
  (all T steps of a chunk in one kernel), with the membrane potential carried between calls, so a
  long run can be fed in chunks of steps.
* :class:`MultiStep` — runs an ordinary, stateless layer (conv, linear, pooling, flatten) over
  ``(T, B, ...)`` by folding T into the batch: one call of the layer for all steps.
* :class:`CumulativeMaxPool2d` — max pooling for spiking nets whose *rate* equals the max of the
  input rates (see the class doc); spikes in -> spikes out.
* :class:`IntegrateOutput` — the output layer: integrates its input current without firing;
  the prediction is the argmax of the accumulated potential.

State protocol (:class:`Stateful`): ``reset()`` forgets the state (call it before every new
input), ``keep(index)`` keeps only the given batch rows of the state (used by early exit to drop
finished samples between chunks). State tensors have the batch first, ``(B, ...)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from kdengine.ops.if_multistep import if_multistep

__all__ = [
    "Stateful",
    "IFNeuron",
    "MultiStep",
    "CumulativeMaxPool2d",
    "IntegrateOutput",
    "reset_states",
    "keep_states",
]


def _check_seq(x: object, name: str = "x", min_dim: int = 2) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (T, B, ...), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have shape (T, B, ...) with time steps first (at least {min_dim} dims), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[0] < 1:
        raise ValueError(f"{name} must have T >= 1 time steps (dim 0), got shape {tuple(x.shape)}")
    return x


class Stateful(nn.Module):
    """A multi-step module with state carried between calls (batch-first state tensors)."""

    _state_names: tuple[str, ...] = ()

    def reset(self) -> None:
        """Forget the state: the next call starts from the resting state."""
        for n in self._state_names:
            setattr(self, n, None)

    @torch.no_grad()
    def keep(self, index: Tensor) -> None:
        """Keep only the batch rows ``index`` (int64 indices or a bool mask) of the state."""
        for n in self._state_names:
            s = getattr(self, n)
            if s is not None:
                setattr(self, n, s[index])

    def _check_state_batch(self, state: Optional[Tensor], x: Tensor, name: str) -> None:
        if state is not None and tuple(state.shape) != tuple(x.shape[1:]):
            raise ValueError(
                f"{type(self).__name__}: the carried {name} has shape {tuple(state.shape)} but this "
                f"chunk's steps have shape {tuple(x.shape[1:])}; call reset() before a new input "
                "(or keep() to drop batch rows)"
            )


def reset_states(module: nn.Module) -> None:
    """``reset()`` every :class:`Stateful` submodule of ``module``."""
    for m in module.modules():
        if isinstance(m, Stateful):
            m.reset()


def keep_states(module: nn.Module, index: Tensor) -> None:
    """``keep(index)`` on every :class:`Stateful` submodule of ``module``."""
    for m in module.modules():
        if isinstance(m, Stateful):
            m.keep(index)


class IFNeuron(Stateful):
    """Multi-step integrate-and-fire neurons (no leak), state carried between calls.

    ``forward(x)``: ``x`` ``(T, B, ...)`` input currents -> spikes ``(T, B, ...)`` (0/1, x's
    dtype), computed by :func:`kdengine.ops.spiking.if_multistep` starting from the potential left
    by the previous call (``self.v``, ``(B, ...)``), or from ``init_potential`` after
    :meth:`reset`.

    Args:
        v_threshold: firing threshold (> 0).
        v_reset: None: reset by subtraction (the conversion default: no information is lost at a
            spike); a number: hard reset to that potential.
        init_potential: the potential after :meth:`reset`, as a *fraction of the threshold*
            (default 0; 0.5 halves the quantisation error of a converted layer at small T,
            Rueckauer et al. 2017 / Bu et al. 2022). With a hard reset and 0, the start is
            ``v_reset``.
        surrogate, alpha, detach_reset: passed to the op (training through time).
        backend: the op's backend (None: auto).
        count_spikes: keep ``self.spike_count`` (total spikes since :meth:`reset_count`) and
            ``self.neuron_steps`` (neurons x steps x batch seen), for firing-rate statistics.

    ``self.v`` keeps its autograd graph between calls (training through chunks): call
    :meth:`reset` (or :meth:`detach_state`) between inputs so the graph does not grow.
    """

    _state_names = ("v",)

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset: Optional[float] = None,
        *,
        init_potential: float = 0.0,
        surrogate: str = "atan",
        alpha: Optional[float] = None,
        detach_reset: bool = False,
        backend: Optional[str] = None,
        count_spikes: bool = False,
    ) -> None:
        super().__init__()
        thr = float(v_threshold)
        if not (math.isfinite(thr) and thr > 0):
            raise ValueError(f"v_threshold must be finite and > 0, got {v_threshold}")
        ip = float(init_potential)
        if not math.isfinite(ip):
            raise ValueError(f"init_potential must be finite, got {init_potential}")
        if v_reset is not None and float(v_reset) >= thr:
            raise ValueError(f"v_reset must be below v_threshold, got {v_reset} >= {thr}")
        self.v_threshold = thr
        self.v_reset = None if v_reset is None else float(v_reset)
        self.init_potential = ip
        self.surrogate = surrogate
        self.alpha = alpha
        self.detach_reset = bool(detach_reset)
        self.backend = backend
        self.count_spikes = bool(count_spikes)
        self.v: Optional[Tensor] = None
        self.reset_count()

    def reset_count(self) -> None:
        """Zero the spike statistics."""
        self.spike_count = 0.0
        self.neuron_steps = 0

    def detach_state(self) -> None:
        """Cut the autograd graph of the carried potential (truncated BPTT between chunks)."""
        if self.v is not None:
            self.v = self.v.detach()

    def _initial(self, x: Tensor) -> Optional[Tensor]:
        if self.v is not None:
            return self.v
        if self.init_potential == 0.0:
            return None  # the op's resting potential (v_reset for a hard reset, else 0)
        return torch.full(x.shape[1:], self.init_potential * self._threshold_value(), dtype=x.dtype,
                          device=x.device)

    def _threshold_value(self) -> float:
        """The current threshold as a number (subclasses with a learned threshold read it)."""
        return self.v_threshold

    def _fire(self, x: Tensor, v0: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(spikes, v_final)`` of the neurons on ``x`` ``(T, ...)`` from ``v0`` (None: rest)."""
        return if_multistep(
            x,
            self.v_threshold,
            self.v_reset,
            v_init=v0,
            return_v=True,
            surrogate=self.surrogate,
            alpha=self.alpha,
            detach_reset=self.detach_reset,
            backend=self.backend,
        )

    def forward(self, x: Tensor) -> Tensor:
        x = _check_seq(x)
        self._check_state_batch(self.v, x, "potential v")
        v0 = self._initial(x)
        # A channels-last (T, B, C, H, W) input (memory order T, B, H, W, C: what a channels-last
        # conv or the packed binary conv produce) runs in its memory order: neurons are
        # independent, so the order is free, and the spikes stay channels-last for the next conv
        # instead of paying a layout copy here and another one there.
        cl = x.dim() == 5 and not x.is_contiguous() and x.permute(0, 1, 3, 4, 2).is_contiguous()
        if cl:
            x = x.permute(0, 1, 3, 4, 2)
            if v0 is not None:
                v0 = v0.permute(0, 2, 3, 1)
        s, v = self._fire(x, v0)
        if cl:
            s, v = s.permute(0, 1, 4, 2, 3), v.permute(0, 3, 1, 2)
        self.v = v
        if self.count_spikes:
            self.spike_count += float(s.detach().sum())
            self.neuron_steps += s.numel()
        return s

    def extra_repr(self) -> str:
        reset = "subtract" if self.v_reset is None else f"hard({self.v_reset})"
        return (f"v_threshold={self.v_threshold:.6g}, reset={reset}, "
                f"init_potential={self.init_potential:g}")


class MultiStep(nn.Module):
    """Run a stateless layer over ``(T, B, ...)`` by folding T into the batch.

    ``forward(x)`` = ``module(x.flatten(0, 1)).unflatten(0, (T, B))``: one call for all steps,
    the same numbers as calling ``module`` on each step (the layer must treat batch rows
    independently: conv, linear, pooling, flatten, eval-mode norm layers).

    ``channels_last``: hand 4-d step tensors to the module in channels-last memory order (a no-op
    when they already are); torch's CPU convolutions with few channels run ~2x faster that way.
    Values are unchanged; the output keeps whatever layout the module gives.
    """

    def __init__(self, module: nn.Module, *, channels_last: bool = False) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.module = module
        self.channels_last = bool(channels_last)

    def forward(self, x: Tensor) -> Tensor:
        x = _check_seq(x)
        t, b = x.shape[0], x.shape[1]
        xf = x.flatten(0, 1)
        if self.channels_last and xf.dim() == 4:
            xf = xf.contiguous(memory_format=torch.channels_last)
        y = self.module(xf)
        return y.unflatten(0, (t, b))


class CumulativeMaxPool2d(Stateful):
    """Max pooling whose output rate is the max of the input rates (rate-exact max pooling).

    Max pooling does not commute with averaging over time: pooling each step's spikes (an OR
    over the window) over-counts, pooling each step's currents over-estimates as well. This layer
    keeps the running sums ``S_t`` of its inputs and emits ``y_t = maxpool(S_t) - maxpool(S_{t-1})``,
    so the accumulated output ``sum_t y_t = maxpool(S_t)`` is exactly the max over the window of
    the accumulated inputs, and ``y`` averaged over t tends to ``maxpool`` of the input means —
    what the ANN computes. Spikes in (integer counts) give spikes out (the max of counts grows by
    0 or 1 per step). Used by :func:`kdengine.snn.convert` for ``nn.MaxPool2d``, before the ReLU
    (on currents) or after it (on spikes).

    ``x``: ``(T, B, C, H, W)``; state: ``S`` ``(B, C, H, W)`` and ``M`` ``(B, C, OH, OW)``.
    """

    _state_names = ("S", "M")

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride) if stride is not None else self.kernel_size
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.ceil_mode = bool(ceil_mode)
        self.S: Optional[Tensor] = None
        self.M: Optional[Tensor] = None

    @classmethod
    def from_maxpool(cls, m: nn.MaxPool2d) -> "CumulativeMaxPool2d":
        if m.return_indices:
            raise ValueError("MaxPool2d(return_indices=True) cannot be converted")
        return cls(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)

    def _pool(self, s: Tensor) -> Tensor:
        return F.max_pool2d(s, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        x = _check_seq(x, min_dim=5)
        self._check_state_batch(self.S, x, "running sum S")
        cum = torch.cumsum(x, dim=0)
        if self.S is not None:
            cum = cum + self.S
        t, b = x.shape[0], x.shape[1]
        m = self._pool(cum.flatten(0, 1)).unflatten(0, (t, b))
        prev = self.M if self.M is not None else torch.zeros_like(m[0])
        y = torch.diff(m, dim=0, prepend=prev.unsqueeze(0))
        self.S, self.M = cum[-1], m[-1]
        return y

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class IntegrateOutput(Stateful):
    """Output layer that only integrates: ``v_t = v_{t-1} + x_t``, no threshold, no reset.

    ``forward(x)``: ``(T, B, K)`` currents -> ``(T, B, K)`` accumulated potentials, float64 (one
    per step, continuing from the previous call's ``self.v``; float64 so that thousands of steps
    of float32 currents lose no digit that could flip a close argmax). The prediction after ``t`` steps is
    ``argmax`` of the potential; ``potential / t`` estimates the ANN's logits when the net was
    converted by :func:`kdengine.snn.convert` (the output layer is not normalised).
    """

    _state_names = ("v",)

    def __init__(self) -> None:
        super().__init__()
        self.v: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        x = _check_seq(x)
        self._check_state_batch(self.v, x, "potential v")
        acc = torch.cumsum(x.to(torch.float64), dim=0)
        if self.v is not None:
            acc = acc + self.v
        self.v = acc[-1]
        return acc

    def prediction(self) -> Tensor:
        """``argmax`` of the current potential, int64 ``(B,)``."""
        if self.v is None:
            raise RuntimeError("IntegrateOutput has no potential yet: run the network first")
        return self.v.argmax(-1)
