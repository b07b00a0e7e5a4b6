"""Running a converted SNN: chunks of time steps, run-time early exit, per-input step counts.

``run_snn(snn, x, T, early_exit=None)`` feeds each batch through ``T`` steps in chunks of
``chunk`` steps (the state is carried between chunks). After every step it reads the output
potentials (the accumulated currents of the :class:`~kdengine.snn.layers.IntegrateOutput` layer)
and, with an :class:`EarlyExit` rule, freezes the decision of every input whose rule fired; finished
inputs are dropped from the batch before the next chunk (``snn.keep``), so their remaining steps
are not computed. Reported per input: ``steps_used`` (the step of the decision) and
``steps_computed`` (steps actually simulated: ``steps_used`` rounded up to the chunk).

The rule reads only the output potential trajectory, which does not depend on when other inputs
stop, so :func:`simulate_early_exit` on recorded potentials gives exactly what the online run gives
(tested) — that is how rules are tuned without re-running the network.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["EarlyExit", "SNNRun", "run_snn", "simulate_early_exit"]


@dataclass(frozen=True)
class EarlyExit:
    """Run-time exit rule; an input stops at the first step ``t >= min_steps`` where

    * its decision is *stable*: the argmax of the accumulated output potential has been the same
      (and strictly ahead of the runner-up) for ``stable_steps`` consecutive steps, or
    * its *margin* is clear: ``(top1 - top2) / t >= margin`` — the gap between the two largest
      potentials per step, in the units of the ANN's logits for a converted net.

    Unset criteria are ignored; at least one must be set. All-equal potentials (nothing has reached
    the output yet) never count as a decision.
    """

    stable_steps: Optional[int] = None
    margin: Optional[float] = None
    min_steps: int = 1

    def __post_init__(self) -> None:
        if self.stable_steps is None and self.margin is None:
            raise ValueError("EarlyExit needs stable_steps and/or margin")
        if self.stable_steps is not None:
            if isinstance(self.stable_steps, bool) or not isinstance(self.stable_steps, numbers.Integral) \
                    or self.stable_steps < 1:
                raise ValueError(f"stable_steps must be a positive int, got {self.stable_steps!r}")
        if self.margin is not None:
            if isinstance(self.margin, bool) or not isinstance(self.margin, numbers.Real) \
                    or not math.isfinite(self.margin) or self.margin <= 0:
                raise ValueError(f"margin must be a finite number > 0, got {self.margin!r}")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, numbers.Integral) \
                or self.min_steps < 1:
            raise ValueError(f"min_steps must be a positive int, got {self.min_steps!r}")

    def describe(self) -> str:
        parts = []
        if self.stable_steps is not None:
            parts.append(f"stable {self.stable_steps} steps")
        if self.margin is not None:
            parts.append(f"margin/t >= {self.margin:g}")
        return " or ".join(parts) + (f", min {self.min_steps} steps" if self.min_steps > 1 else "")


class _ExitTracker:
    """Per-input state of an :class:`EarlyExit` rule (consecutive-stable counter, last argmax)."""

    def __init__(self, rule: EarlyExit, n: int, device: torch.device) -> None:
        self.rule = rule
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.last = torch.full((n,), -1, dtype=torch.int64, device=device)

    def step(self, pot: Tensor, t: int) -> Tensor:
        """``pot`` ``(A, K)`` potentials after step ``t`` (1-based) -> bool ``(A,)``: exit now."""
        top = pot.topk(2, dim=-1).values
        decided = top[:, 0] > top[:, 1]
        am = pot.argmax(-1)
        same = decided & (am == self.last)
        self.count = torch.where(decided, torch.where(same, self.count + 1, 1), 0)
        self.last = torch.where(decided, am, -1)
        ex = torch.zeros_like(decided)
        if t < self.rule.min_steps:
            return ex
        if self.rule.stable_steps is not None:
            ex |= self.count >= self.rule.stable_steps
        if self.rule.margin is not None:
            ex |= decided & ((top[:, 0] - top[:, 1]) / t >= self.rule.margin)
        return ex

    def keep(self, idx: Tensor) -> None:
        self.count, self.last = self.count[idx], self.last[idx]


@dataclass
class SNNRun:
    """What :func:`run_snn` returns (``N`` inputs, ``T`` steps, ``K`` classes).

    ``predictions`` int64 ``(N,)``; ``steps_used`` int64 ``(N,)`` (step of the decision, T without
    exit); ``steps_computed`` int64 ``(N,)``; ``step_predictions`` int64 ``(T, N)``: the decision
    after each step (frozen after an exit); ``accuracy_trace`` float64 ``(T,)`` when labels were
    given; ``potentials`` float64 ``(T, N, K)`` when asked for; ``seconds``: wall time.
    """

    predictions: Tensor
    steps_used: Tensor
    steps_computed: Tensor
    step_predictions: Tensor
    accuracy_trace: Optional[Tensor]
    potentials: Optional[Tensor]
    seconds: float

    @property
    def mean_steps(self) -> float:
        return float(self.steps_used.double().mean())

    @property
    def mean_steps_computed(self) -> float:
        return float(self.steps_computed.double().mean())

    def accuracy(self, labels: Tensor) -> float:
        return float((self.predictions == labels.to(self.predictions.device)).double().mean())


def _check_int(name: str, v: object, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


@torch.no_grad()
def run_snn(
    snn,
    x: Tensor,
    T: int,
    early_exit: Optional[EarlyExit] = None,
    *,
    labels: Optional[Tensor] = None,
    batch_size: int = 500,
    chunk: Optional[int] = None,
    return_potentials: bool = False,
) -> SNNRun:
    """Run ``snn`` on the static inputs ``x`` ``(N, ...)`` for up to ``T`` steps.

    Args:
        snn: a :class:`~kdengine.snn.convert.SpikingNetwork`.
        x: inputs ``(N, ...)`` (images; encoded by the net's encoding).
        T: maximum number of time steps (>= 1).
        early_exit: an :class:`EarlyExit` rule, or None to run all T steps.
        labels: int64 ``(N,)``; gives ``accuracy_trace`` (accuracy of the decision after each step).
        batch_size: inputs per batch (memory: ``chunk * batch_size`` steps of every layer).
        chunk: steps per call of the network (default: 4 with early exit — an exit is noticed
            within the chunk, but up to ``chunk - 1`` extra steps may be computed — else 16).
        return_potentials: keep the output potentials of every step (no early exit only).

    Returns:
        :class:`SNNRun`.
    """
    from kdengine.snn.convert import SpikingNetwork

    if not isinstance(snn, SpikingNetwork):
        raise TypeError(f"snn must be a SpikingNetwork (from kdengine.snn.convert), got {type(snn).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise TypeError("x must be a floating tensor of inputs (N, ...)")
    T = _check_int("T", T)
    batch_size = _check_int("batch_size", batch_size)
    if early_exit is not None and not isinstance(early_exit, EarlyExit):
        raise TypeError(f"early_exit must be an EarlyExit or None, got {type(early_exit).__name__}")
    if return_potentials and early_exit is not None:
        raise ValueError("return_potentials needs early_exit=None (exited inputs stop producing potentials)")
    chunk = _check_int("chunk", chunk) if chunk is not None else (4 if early_exit is not None else 16)
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (x.shape[0],):
            raise ValueError(f"labels must be int64 of shape ({x.shape[0]},)")
    n = x.shape[0]
    dev = next((b.device for b in snn.buffers()), None) or next(
        (p.device for p in snn.parameters()), torch.device("cpu"))
    preds = torch.empty(n, dtype=torch.int64)
    used = torch.full((n,), T, dtype=torch.int64)
    computed = torch.zeros(n, dtype=torch.int64)
    step_pred = torch.empty((T, n), dtype=torch.int64)
    pots = [] if return_potentials else None
    t_start = time.perf_counter()
    was_training = snn.training
    snn.eval()
    try:
        for bi, b0 in enumerate(range(0, n, batch_size)):
            xb = x[b0:b0 + batch_size].to(dev)
            nb = xb.shape[0]
            snn.reset(seed_offset=bi)
            active = torch.arange(nb)
            tracker = _ExitTracker(early_exit, nb, torch.device("cpu")) if early_exit else None
            bpots = []
            t0 = 0
            while t0 < T and active.numel() > 0:
                c = min(chunk, T - t0)
                if snn.encoding == "poisson":
                    seq = snn.encode(xb, c)  # the whole batch: each input's draws do not depend on exits
                    pot = snn(seq[:, active.to(dev)] if active.numel() < nb else seq)
                else:
                    pot = snn(xb[active.to(dev)] if active.numel() < nb else xb, c)
                pot = pot.cpu()  # (c, A, K)
                computed[b0 + active] += c
                am = pot.argmax(-1)  # (c, A)
                step_pred[t0:t0 + c, b0 + active] = am
                if return_potentials:
                    bpots.append(pot)
                if tracker is not None:
                    exit_at = torch.full((active.numel(),), -1, dtype=torch.int64)
                    for j in range(c):
                        ex = tracker.step(pot[j], t0 + j + 1) & (exit_at < 0)
                        exit_at[ex] = j
                    done = exit_at >= 0
                    if bool(done.any()):
                        rows = active[done]
                        dec = am[exit_at[done], done.nonzero().flatten()]
                        preds[b0 + rows] = dec
                        used[b0 + rows] = t0 + exit_at[done] + 1
                        keep = (~done).nonzero().flatten()
                        snn.keep(keep.to(dev))
                        tracker.keep(keep)
                        active = active[keep]
                t0 += c
            if active.numel() > 0:
                preds[b0 + active] = step_pred[T - 1, b0 + active]
            if return_potentials:
                pots.append(torch.cat(bpots, 0))
        snn.reset()
    finally:
        snn.train(was_training)
    # freeze each decision after its exit step
    steps = torch.arange(1, T + 1).unsqueeze(1)
    step_pred = torch.where(steps > used.unsqueeze(0), preds.unsqueeze(0), step_pred)
    trace = None
    if labels is not None:
        trace = (step_pred == labels.cpu().unsqueeze(0)).double().mean(1)
    return SNNRun(preds, used, computed, step_pred, trace,
                  torch.cat(pots, 1) if return_potentials else None, time.perf_counter() - t_start)


def simulate_early_exit(potentials: Tensor, rule: EarlyExit, T: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Apply ``rule`` to recorded output potentials ``(T_rec, N, K)`` with the cap ``T`` (default
    ``T_rec``): ``(predictions int64 (N,), steps_used int64 (N,))``, exactly what
    :func:`run_snn` with ``early_exit=rule`` reports for those inputs."""
    if not isinstance(potentials, Tensor) or potentials.dim() != 3:
        raise ValueError("potentials must be (T, N, K)")
    if not isinstance(rule, EarlyExit):
        raise TypeError("rule must be an EarlyExit")
    t_rec, n, _ = potentials.shape
    T = t_rec if T is None else _check_int("T", T)
    if T > t_rec:
        raise ValueError(f"T={T} exceeds the {t_rec} recorded steps")
    tracker = _ExitTracker(rule, n, potentials.device)
    used = torch.full((n,), T, dtype=torch.int64, device=potentials.device)
    open_ = torch.ones(n, dtype=torch.bool, device=potentials.device)
    preds = potentials[T - 1].argmax(-1)
    for t in range(T):
        ex = tracker.step(potentials[t], t + 1) & open_
        if bool(ex.any()):
            used[ex] = t + 1
            preds[ex] = potentials[t][ex].argmax(-1)
            open_ &= ~ex
            if not bool(open_.any()):
                break
    return preds, used
