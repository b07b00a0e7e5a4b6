"""SNN stage: convert the binary-weight student to a binary SNN and apply the latency cuts.

1. :func:`kdengine.snn.calibrate` on ``n_calib`` *training* images; the conversion
   (:func:`kdengine.snn.convert`, direct encoding, IF neurons with reset by subtraction) runs the
   spike x binary-weight layers on the packed AND-popcount kernel (``binary="packed"``).
2. Design-time cut: :func:`kdengine.snn.search_scaling` at the target ``t_search`` steps on
   ``n_search`` *held-out* images (the last images of the 8,000 train part, never used to train).
3. Run-time cut: :func:`kdengine.snn.tune_early_exit` on the potentials of all held-out images
   (cap ``t_ref`` steps; at most ``ee_max_loss`` accuracy loss and ``ee_max_flip`` changed
   decisions at 95 % confidence), then applied online (``run_snn(early_exit=rule)``) on the test
   images: accuracy, steps used per image.
4. For the plot: the accuracy after every step ``1..t_max`` on the test images, without cuts
   (percentile 99.9) and with the searched scaling.
5. Batch-1 latency: ``run_snn`` with the early-exit rule on single test images, one at a time.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from kdengine.infer.runtime import latency_stats
from kdengine.nn import state_nbytes
from kdengine.snn import calibrate, convert, run_snn, search_scaling, tune_early_exit

__all__ = ["run_snn_stage", "snn_bar_total"]


def snn_bar_total(cfg, model: nn.Module) -> int:
    """Units of the stage's progress bar: calibration, the runs, the scaling candidates (baseline,
    grid, two per-layer refinements per hidden layer; an upper bound) and the latency images."""
    hidden = sum(1 for m in model.modules() if isinstance(m, nn.ReLU))
    grid = len(cfg.search_percentiles) * len(cfg.search_scales) * len(cfg.search_init_potentials)
    return 5 + (1 + grid + (2 * hidden if hidden > 1 else 0)) + cfg.snn_latency_images


def _r(v: float, n: int = 4) -> float:
    return round(float(v), n)


def run_snn_stage(model: nn.Module, x_calib: Tensor, x_val: Tensor, y_val: Tensor, x_test: Tensor,
                  y_test: Tensor, cfg, bar: Any) -> dict:
    """Steps 1-5 of the module docstring; returns a JSON-ready dict (traces included)."""
    model.eval()
    with torch.no_grad():
        ann_acc = float((model(x_test).argmax(1) == y_test).double().mean())
    cal = calibrate(model, x_calib)
    bar.update(1)

    # the baseline SNN (no cuts) on the test images, every step up to t_max (for the plot)
    base = convert(model, cal, 99.9)
    r0 = run_snn(base, x_test, cfg.t_max, labels=y_test)
    bar.update(1)

    search = search_scaling(cal, x_val[:cfg.n_search], y_val[:cfg.n_search], cfg.t_search,
                            percentiles=cfg.search_percentiles, scales=cfg.search_scales,
                            init_potentials=cfg.search_init_potentials, log=lambda *_: bar.update(1))
    snn = convert(model, cal, **search.config)
    layers = list(snn.info.get("layers", []))

    rv = run_snn(snn, x_val, cfg.t_ref, labels=y_val, return_potentials=True)
    rule, summ = tune_early_exit(rv.potentials, y_val, T=cfg.t_ref, max_loss=cfg.ee_max_loss,
                                 max_flip=cfg.ee_max_flip, flip_z=1.645)
    bar.update(1)

    r1 = run_snn(snn, x_test, cfg.t_max, labels=y_test)
    bar.update(1)
    fixed_acc = float(r1.accuracy_trace[cfg.t_ref - 1])
    res: dict[str, Any] = {
        "ann_test_accuracy": _r(ann_acc),
        "n_test": len(x_test), "n_heldout": len(x_val), "n_calibration": len(x_calib),
        "layers": layers, "notes": list(snn.notes),
        "search": {"T": cfg.t_search, "n_heldout": cfg.n_search, "config": search.config,
                   "heldout_score": _r(search.score), "heldout_baseline_score": _r(search.baseline["score"]),
                   "candidates": len(search.table), "seconds": _r(search.seconds, 2)},
        "trace_baseline": [_r(v) for v in r0.accuracy_trace.tolist()],
        "trace_tuned": [_r(v) for v in r1.accuracy_trace.tolist()],
        "fixed_T": cfg.t_ref, "fixed_T_accuracy": _r(fixed_acc),
        "fixed_T_accuracy_baseline": _r(float(r0.accuracy_trace[cfg.t_ref - 1])),
        "us_per_image_step": _r(1e6 * r1.seconds / (len(x_test) * cfg.t_max), 1),
        "state_bytes": state_nbytes(snn),
    }
    ee: dict[str, Any] = {"cap": cfg.t_ref, "tuned_on_heldout": len(x_val),
                          "heldout_full_T_accuracy": _r(summ["full_accuracy"])}
    if rule is None:
        ee["rule"] = None
        res.update(test_accuracy=_r(fixed_acc), mean_steps=float(cfg.t_ref), early_exit=ee)
        bar.update(1)
    else:
        re_ = run_snn(snn, x_test, cfg.t_ref, early_exit=rule, labels=y_test)
        bar.update(1)
        steps = re_.steps_used.double()
        ee.update(rule=rule.describe(), heldout_accuracy=_r(summ["accuracy"]),
                  heldout_mean_steps=_r(summ["mean_steps"], 2),
                  test_accuracy=_r(re_.accuracy(y_test)), mean_steps_used=_r(re_.mean_steps, 2),
                  mean_steps_computed=_r(re_.mean_steps_computed, 2),
                  steps_p50_p90_max=[int(steps.quantile(0.5)), int(steps.quantile(0.9)), int(steps.max())],
                  step_cut_vs_cap=_r(cfg.t_ref / re_.mean_steps, 2),
                  seconds=_r(re_.seconds, 2))
        res.update(test_accuracy=ee["test_accuracy"], mean_steps=ee["mean_steps_used"], early_exit=ee)

    # batch-1 latency: one image per call, the exit rule applied online
    run_snn(snn, x_test[:1], cfg.t_ref, early_exit=rule, batch_size=1)  # warm-up, untimed
    times = []
    for i in range(cfg.snn_latency_images):
        xi = x_test[i:i + 1]
        t0 = time.perf_counter()
        run_snn(snn, xi, cfg.t_ref, early_exit=rule, batch_size=1)
        times.append(time.perf_counter() - t0)
        bar.update(1)
    lat = latency_stats(times, 1)
    res["latency_batch1_ms"] = {"p50_ms": _r(lat.p50_ms), "p99_ms": _r(lat.p99_ms), "mean_ms": _r(lat.mean_ms),
                                "repeat": lat.repeat, "images": cfg.snn_latency_images}
    return res
