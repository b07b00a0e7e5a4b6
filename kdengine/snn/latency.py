"""Latency cuts for converted SNNs: a design-time scaling search and run-time early-exit tuning.

Design time (:func:`search_scaling`). A converted layer's threshold stands for ``lambda_l`` (a
percentile of its ANN activations): the higher it is, the fewer spikes carry the same value and the
more steps the rate code needs; the lower, the more of the largest activations are clipped. The
search evaluates the SNN on a *held-out* split at the target number of steps ``T`` over a grid of
(percentile, global threshold scale, initial potential), then refines the scale of each hidden
layer in turn (coordinate search over ``layer_factors``), keeping a change only when it improves
the objective: the mean accuracy over the last half of the steps, ``t`` in ``(T/2, T]`` (the
accuracy at one step jumps by an image or two from step to step; the mean over many steps is a
steadier score of "accurate by T"), ties broken by the mean accuracy over steps ``1..T`` (which
rewards converging early). One calibration pass serves every candidate.

Run time (:func:`tune_early_exit`). From the output potentials recorded on the held-out split,
every rule of a grid (stable decision for k steps, margin per step, both, each with a minimum
number of steps) is simulated exactly (:func:`~kdengine.snn.run.simulate_early_exit`); the rule
with the fewest mean steps whose accuracy stays within ``max_loss`` of the full-``T`` accuracy —
and, with ``max_flip``, whose decisions differ from the full-``T`` decisions on at most that
fraction of the inputs — is chosen. Apply it with ``run_snn(..., early_exit=rule)`` on new inputs.

Why ``max_flip``: picking the most aggressive of hundreds of rules by its *net* accuracy change on
a few hundred inputs is a winner's-curse selection: a rule that breaks a dozen decisions and
happens to fix a dozen others passes the accuracy test and then loses on new data. The number of
changed decisions does not cancel that way, so bounding it is the steadier criterion; with
``flip_z > 0`` the bound applies to the one-sided Wilson upper confidence limit of the changed
fraction (``flip_z = 1.645``: 95 %), not to the observed fraction, which charges a rule for the
few hundred inputs it was judged on.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import Tensor

from kdengine.snn.convert import Calibration, convert
from kdengine.snn.run import EarlyExit, run_snn, simulate_early_exit

__all__ = ["ScalingSearch", "search_scaling", "tune_early_exit", "evaluate_config"]


@dataclass
class ScalingSearch:
    """Result of :func:`search_scaling`.

    ``config``: keyword arguments for :func:`~kdengine.snn.convert.convert` (``percentile``,
    ``threshold_scale`` — one per hidden layer — and ``init_potential``); ``score``: the
    objective on the held-out split (mean accuracy over steps ``(T/2, T]``); ``accuracy`` /
    ``mean_accuracy``: accuracy after ``T`` steps / mean over 1..T;
    ``baseline``: the same numbers for the starting configuration (p=99.9, scale 1, v0=0);
    ``table``: every evaluated candidate; ``seconds``: wall time.
    """

    config: dict
    score: float
    accuracy: float
    mean_accuracy: float
    T: int
    baseline: dict
    table: list = field(default_factory=list)
    seconds: float = 0.0


def evaluate_config(cal: Calibration, x: Tensor, y: Tensor, T: int, config: dict, *,
                    batch_size: int = 500, **convert_kwargs: Any) -> tuple[float, float, Tensor]:
    """Convert with ``config`` and run on ``(x, y)`` for ``T`` steps:
    ``(score = mean accuracy over steps (T/2, T], mean accuracy over 1..T, accuracy trace (T,))``."""
    snn = convert(None, cal, **config, **convert_kwargs)
    r = run_snn(snn, x, T, labels=y, batch_size=batch_size)
    tr = r.accuracy_trace
    return float(tr[T // 2:].mean()), float(tr.mean()), tr


def search_scaling(
    calibration: Calibration,
    x_val: Tensor,
    y_val: Tensor,
    T: int,
    *,
    percentiles: Sequence[float] = (99.0, 99.5, 99.9, 99.99, 100.0),
    scales: Sequence[float] = (0.7, 0.85, 1.0),
    init_potentials: Sequence[float] = (0.0, 0.5),
    per_layer: bool = True,
    layer_factors: Sequence[float] = (0.8, 1.25),
    batch_size: int = 500,
    log=None,
    **convert_kwargs: Any,
) -> ScalingSearch:
    """Design-time search of the per-layer threshold scaling (see the module doc).

    Args:
        calibration: from :func:`~kdengine.snn.convert.calibrate` (on the training inputs).
        x_val, y_val: the held-out split (not the test set) the candidates are scored on.
        T: target number of time steps.
        percentiles, scales, init_potentials: the global grid.
        per_layer: then refine each hidden layer's scale by ``layer_factors``.
        batch_size: run batch size.
        log: optional ``print``-like callable for progress.
        convert_kwargs: passed to :func:`convert` (``encoding``, ``binary``, ``backend``...).
    """
    if not isinstance(calibration, Calibration):
        raise TypeError("calibration must be a Calibration (kdengine.snn.calibrate(model, data))")
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if len(percentiles) == 0 or len(scales) == 0 or len(init_potentials) == 0:
        raise ValueError("percentiles, scales and init_potentials must be non-empty")
    t0 = time.perf_counter()
    L = calibration.n_hidden
    table = []

    accs = {}

    def score(cfg: dict, stage: str) -> tuple[float, float]:
        sc, mean, tr = evaluate_config(calibration, x_val, y_val, T, cfg, batch_size=batch_size,
                                       **convert_kwargs)
        row = {"stage": stage, "percentile": cfg["percentile"],
               "threshold_scale": [round(s, 4) for s in cfg["threshold_scale"]],
               "init_potential": cfg["init_potential"], "score": sc,
               "accuracy": float(tr[-1]), "mean_accuracy": mean}
        table.append(row)
        accs[id(cfg)] = float(tr[-1])
        if log:
            log(f"    {stage}: p={cfg['percentile']} scale={row['threshold_scale']} "
                f"v0={cfg['init_potential']} -> score {sc:.4f}, acc@T {tr[-1]:.4f}, mean {mean:.4f}")
        return sc, mean

    base_cfg = {"percentile": 99.9, "threshold_scale": [1.0] * L, "init_potential": 0.0}
    base = score(base_cfg, "baseline")
    best_cfg, best = base_cfg, base
    for p, s, v0 in itertools.product(percentiles, scales, init_potentials):
        cfg = {"percentile": float(p), "threshold_scale": [float(s)] * L, "init_potential": float(v0)}
        if cfg == base_cfg:
            continue
        sc = score(cfg, "grid")
        if sc > best:
            best_cfg, best = cfg, sc
    if per_layer and L > 1:
        for l in range(L):
            cur = best_cfg
            for f in layer_factors:
                sc_list = list(cur["threshold_scale"])
                sc_list[l] = round(sc_list[l] * float(f), 6)
                cfg = dict(cur, threshold_scale=sc_list)
                sc = score(cfg, f"layer {l}")
                if sc > best:
                    best_cfg, best = cfg, sc
    return ScalingSearch(
        config=best_cfg, score=best[0], accuracy=accs[id(best_cfg)], mean_accuracy=best[1], T=T,
        baseline={"config": base_cfg, "score": base[0], "accuracy": accs[id(base_cfg)],
                  "mean_accuracy": base[1]},
        table=table, seconds=time.perf_counter() - t0,
    )


def tune_early_exit(
    potentials: Tensor,
    labels: Tensor,
    *,
    T: Optional[int] = None,
    max_loss: float = 0.005,
    max_flip: Optional[float] = None,
    flip_z: float = 0.0,
    stable_grid: Sequence[int] = (2, 3, 4, 6, 8, 12, 16, 24, 32),
    margin_grid: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0),
    min_steps_grid: Sequence[int] = (1, 4, 8),
) -> tuple[Optional[EarlyExit], dict]:
    """Pick the early-exit rule with the fewest mean steps within ``max_loss`` of the accuracy
    after ``T`` steps and, if ``max_flip`` is given, changing at most that fraction of the full-T
    decisions (all measured on the recorded held-out potentials ``(T_rec, N, K)``).

    Returns ``(rule or None if no rule qualifies, summary)`` where ``summary`` has the full-T
    accuracy, the chosen rule's accuracy and mean steps, and every candidate's numbers.
    """
    if not isinstance(potentials, Tensor) or potentials.dim() != 3:
        raise ValueError("potentials must be (T, N, K), e.g. run_snn(..., return_potentials=True)")
    t_rec = potentials.shape[0]
    T = t_rec if T is None else T
    if not (0.0 <= max_loss < 1.0):
        raise ValueError(f"max_loss must be a fraction in [0, 1), got {max_loss}")
    if max_flip is not None and not (0.0 <= max_flip < 1.0):
        raise ValueError(f"max_flip must be a fraction in [0, 1) or None, got {max_flip}")
    if not (flip_z >= 0.0):
        raise ValueError(f"flip_z must be >= 0, got {flip_z}")
    n = potentials.shape[1]
    labels = labels.to(potentials.device)
    full_pred = potentials[T - 1].argmax(-1)
    full_acc = float((full_pred == labels).double().mean())
    cands = []
    for m in min_steps_grid:
        cands += [EarlyExit(stable_steps=k, min_steps=m) for k in stable_grid]
        cands += [EarlyExit(margin=g, min_steps=m) for g in margin_grid]
        cands += [EarlyExit(stable_steps=k, margin=g, min_steps=m) for k in stable_grid for g in margin_grid]
    rows = []
    best, best_key = None, None
    for rule in cands:
        pred, used = simulate_early_exit(potentials, rule, T)
        acc = float((pred == labels).double().mean())
        steps = float(used.double().mean())
        flip = float((pred != full_pred).double().mean())
        flip_ub = _wilson_upper(flip, n, flip_z)
        rows.append({"rule": rule.describe(), "accuracy": acc, "mean_steps": steps, "flipped": flip,
                     "flipped_upper": flip_ub})
        if acc >= full_acc - max_loss - 1e-12 and (max_flip is None or flip_ub <= max_flip + 1e-12):
            key = (steps, -acc)
            if best_key is None or key < best_key:
                best, best_key = rule, key
    summary = {"T": T, "full_accuracy": full_acc, "max_loss": max_loss, "max_flip": max_flip,
               "flip_z": flip_z, "candidates": rows}
    if best is not None:
        row = next(r for r in rows if r["rule"] == best.describe())
        summary.update(rule=best.describe(), accuracy=-best_key[1], mean_steps=best_key[0],
                       step_cut=T / best_key[0], flipped=row["flipped"],
                       flipped_upper=row["flipped_upper"])
    return best, summary


def _wilson_upper(p: float, n: int, z: float) -> float:
    """One-sided Wilson upper confidence limit of a proportion ``p`` observed on ``n`` trials
    (``z = 0``: ``p`` itself)."""
    if z == 0.0 or n == 0:
        return p
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return min(1.0, centre + half)
