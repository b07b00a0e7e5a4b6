"""``kdengine repro snn_mnist``: float and binary-weight CNNs on MNIST converted to spiking networks:
accuracy against time steps, with and without the latency cuts (docs/papers.md section 3, Lu &
Sengupta 2020).

What it does (``kdengine repro snn_mnist``, or :func:`run`):

1. Data: :func:`kdengine.data.load_mnist` (the 10,000 official MNIST test images, split 8,000 /
   2,000 by the fixed seeded permutation, ``seed``). The 8,000 "train" images are split again:
   the first 7,000 train the ANNs (1,000 of them calibrate the conversion), the last 1,000 are
   the *held-out* split on which the latency cuts are tuned. The 2,000 test images are only
   used for the reported numbers.
2. ANNs (the recipe of the paper): :func:`kdengine.models.snn_cnn`. ``float`` is trained with
   Adam + cosine decay (:func:`kdengine.repro.common.fit_adam_steps`); ``binary``
   is the same net through :func:`kdengine.nn.binarize_model` (``mode="weights"``: the middle conv
   and the hidden fc get sign(W) times the per-channel mean|W|, first and last layers stay full
   precision), fine-tuned from the float weights.
3. Conversion (:func:`kdengine.snn.convert`, direct encoding: the analog image every step):
   ReLU -> IF (threshold 1, reset by subtraction), weights normalised by the 99.9th percentile of
   each layer's activations. In the binary SNN the spike x binary-weight layers run on the packed
   AND-popcount kernel (:class:`kdengine.snn.SpikingBinaryConv2d` / ``SpikingBinaryLinear``).
4. Latency cuts, tuned on the held-out split (the early-exit rule must also keep changed
   decisions under 0.5 % at 95 % confidence: an accuracy bound alone let a rule through that
   lost 1.3 test points): design time, :func:`kdengine.snn.search_scaling`
   (grid over percentile x global threshold scale x initial potential at the target ``T``, then a
   per-layer scale refinement); run time, :func:`kdengine.snn.tune_early_exit` (the rule with the
   fewest mean steps within ``ee_val_loss`` of the full-``T_ref`` accuracy on the held-out split
   and whose changed decisions stay under ``ee_val_flip`` at 95 % confidence),
   then applied with ``run_snn(early_exit=rule)`` on the test images, which reports the steps used
   per image.
5. Reported on the test images: accuracy after every step ``t = 1..T_max`` (the table shows
   8/16/32/64/128), the first ``t`` within 1 point of the ANN, early exit's accuracy and mean steps
   against the fixed-``T_ref`` run, wall time per image-step; for the float net also Poisson input
   with the tuned thresholds (500 images).

Budget (< 5 minutes on 2 cores): the SNN numbers use the first ``n_test`` = 1,000 of the 2,000
test images (the ANN accuracy is given on both the 1,000 and all 2,000); the scaling search scores
each candidate on 500 held-out images at ``t_search`` = 32 steps; early exit is tuned on all
1,000 held-out images. ``quick=True``: 1 epoch each, 300 test images, T up to 64, a smaller grid.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

from kdengine.data import load_mnist
from kdengine.models import snn_cnn
from kdengine.nn import binarize_model
from kdengine.repro import ReproArgs, register
from kdengine.repro.common import RunClock, fit_adam_steps
from kdengine.repro.results import pyplot, save_figure, to_json, write_files
from kdengine.snn import (
    calibrate,
    convert,
    run_snn,
    search_scaling,
    simulate_early_exit,
    tune_early_exit,
)

BATCH = 128
__all__ = ["run"]

TABLE_T = (8, 16, 32, 64, 128)


@torch.no_grad()
def _acc(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).double().mean())


def _first_within(trace: list[float], target: float) -> Optional[int]:
    """First step t (1-based) from which the accuracy stays >= target up to the end."""
    t_ok = None
    for t in range(len(trace), 0, -1):
        if trace[t - 1] >= target - 1e-12:
            t_ok = t
        else:
            break
    return t_ok


def _r(v: float, n: int = 4) -> float:
    return round(float(v), n)


def run(
    quick: bool = False,
    *,
    seed: int = 0,
    width: int = 16,
    hidden: int = 128,
    lr: float = 1e-2,
    epochs: Optional[int] = None,
    finetune_epochs: Optional[int] = None,
    n_test: Optional[int] = None,
    t_max: Optional[int] = None,
    t_search: int = 32,
    t_ref: int = 64,
    ee_val_loss: float = 0.003,
    ee_val_flip: float = 0.005,
    quiet: bool = False,
) -> dict:
    """Train, convert, tune, measure; returns a JSON-ready dict (see the module doc).

    ``quick``: 1 epoch each, 300 test images, T up to 64, a small search grid — a smoke run.
    """
    log = (lambda *_: None) if quiet else (lambda *a: print(*a, flush=True))
    epochs = epochs if epochs is not None else (1 if quick else 3)
    finetune_epochs = finetune_epochs if finetune_epochs is not None else (1 if quick else 2)
    n_test = n_test if n_test is not None else (300 if quick else 1000)
    t_max = t_max if t_max is not None else (64 if quick else 128)
    t_ref = min(t_ref, t_max)
    n_search = 150 if quick else 500
    n_ee = 1000  # the whole held-out split: the flip bound below is a confidence limit
    grid = (dict(percentiles=(99.9, 100.0), scales=(0.8, 1.0), init_potentials=(0.0, 0.5))
            if quick else
            dict(percentiles=(99.9, 99.99, 100.0), scales=(0.8, 1.0), init_potentials=(0.0, 0.5)))
    t_all, c_all = time.perf_counter(), time.process_time()
    x8k, y8k = load_mnist("train", seed=seed)
    x_te, y_te = load_mnist("test", seed=seed)
    x_fit, y_fit = x8k[:7000], y8k[:7000]
    x_val, y_val = x8k[7000:], y8k[7000:]
    x_cal = x_fit[:1000]
    x_t, y_t = x_te[:n_test], y_te[:n_test]
    out: dict[str, Any] = {
        "experiment": "snn_mnist",
        "data": {
            "dataset": "MNIST official test set (t10k, 10,000 images; LeCun, Cortes, Burges; CC BY-SA 3.0)",
            "split": ("kdengine.data.load_mnist seeded permutation 8000/2000; of the 8000: first "
                      "7000 train the ANNs (first 1000 of them calibrate the conversion), last "
                      "1000 = held-out split for the latency tuning; the 2000 test images are "
                      "used only for reporting"),
            "seed": seed,
            "n_fit": len(x_fit), "n_calibration": len(x_cal), "n_heldout": len(x_val),
            "n_test_ann": len(x_te), "n_test_snn": len(x_t),
            "heldout_used": {"scaling_search": n_search, "early_exit_tuning": n_ee},
        },
        "config": {"quick": quick, "width": width, "hidden": hidden, "epochs": epochs,
                   "finetune_epochs": finetune_epochs, "lr": lr, "batch": BATCH, "threads": torch.get_num_threads(),
                   "t_max": t_max, "t_search": t_search, "t_ref": t_ref,
                   "ee_val_loss": ee_val_loss, "ee_val_flip": ee_val_flip, "search_grid": grid,
                   "encoding": "direct", "percentile_baseline": 99.9},
        "models": {},
    }
    torch.manual_seed(seed)
    fmodel = snn_cnn(width, hidden)
    log("[float ANN]")
    ftrain = fit_adam_steps(fmodel, x_fit, y_fit, epochs=epochs, lr=lr, seed=seed, binary=False, log=log)
    fmodel.eval()
    log("[binary-weight ANN, fine-tuned from the float weights]")
    bmodel = binarize_model(fmodel, mode="weights")
    btrain = fit_adam_steps(bmodel, x_fit, y_fit, epochs=finetune_epochs, lr=lr, seed=seed + 7,
                            binary=True, log=log)
    bmodel.eval()
    # warm-up: the first call of the native ops loads (or builds) their library; keep that
    # out of the timed SNN runs
    t0 = time.perf_counter()
    for mdl in (fmodel, bmodel):
        run_snn(convert(mdl, x_cal[:16]), x_cal[:16], 2)
    out["warmup_seconds"] = round(time.perf_counter() - t0, 2)
    for name, model, tr in (("float", fmodel, ftrain), ("binary", bmodel, btrain)):
        out["models"][name] = _snn_study(
            name, model, tr, x_cal, x_val, y_val, x_te, y_te, x_t, y_t,
            t_max=t_max, t_search=t_search, t_ref=t_ref, n_search=n_search, n_ee=n_ee,
            grid=grid, ee_val_loss=ee_val_loss, ee_val_flip=ee_val_flip, log=log,
            n_poisson=(0 if quick else 500) if name == "float" else 0)
    out["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    out["cpu_seconds"] = round(time.process_time() - c_all, 1)
    out["checks"] = _checks(out)
    return out


def _snn_study(name, model, train_stats, x_cal, x_val, y_val, x_te, y_te, x_t, y_t, *, t_max,
               t_search, t_ref, n_search, n_ee, grid, ee_val_loss, ee_val_flip, log,
               n_poisson=0) -> dict:
    res: dict[str, Any] = {"train": train_stats}
    res["ann_test_accuracy"] = _r(_acc(model, x_te, y_te))
    res["ann_test_accuracy_snn_subset"] = _r(_acc(model, x_t, y_t))
    res["ann_heldout_accuracy"] = _r(_acc(model, x_val, y_val))
    log(f"[{name}] ANN test acc {res['ann_test_accuracy']:.4f} (SNN subset "
        f"{res['ann_test_accuracy_snn_subset']:.4f}, held-out {res['ann_heldout_accuracy']:.4f})")
    t0 = time.perf_counter()
    cal = calibrate(model, x_cal)
    res["calibration_seconds"] = _r(time.perf_counter() - t0, 2)
    res["positive_fraction"] = [_r(f) for f in cal.positive_fraction]

    # --- baseline conversion (p = 99.9, no latency cuts)
    base = convert(model, cal, 99.9, count_spikes=True)
    res["layers"] = base.info["layers"]
    res["notes"] = base.notes
    r0 = run_snn(base, x_t, t_max, labels=y_t)
    res["baseline"] = _run_summary(base, r0, t_max, len(x_t), res["ann_test_accuracy_snn_subset"])
    res["baseline"]["lambdas"] = [_r(v, 5) for v in base.info["lambdas"]]
    log(f"[{name}] SNN p99.9: " + _fmt_trace(res["baseline"]["accuracy_at"]) +
        f" ({r0.seconds:.1f} s)")

    # --- design-time scaling search on the held-out split
    log(f"[{name}] scaling search at T={t_search} on {n_search} held-out images")
    search = search_scaling(cal, x_val[:n_search], y_val[:n_search], t_search, **grid)
    cfg = search.config
    res["search"] = {"T": t_search, "n_heldout": n_search, "config": cfg,
                     "heldout_score_mean_acc_last_half": _r(search.score),
                     "heldout_accuracy": _r(search.accuracy),
                     "heldout_mean_accuracy": _r(search.mean_accuracy),
                     "heldout_baseline": {"score": _r(search.baseline["score"]),
                                          "accuracy": _r(search.baseline["accuracy"]),
                                          "mean_accuracy": _r(search.baseline["mean_accuracy"])},
                     "evaluations": len(search.table), "seconds": _r(search.seconds, 1)}
    log(f"  best {cfg} -> held-out score {search.score:.4f}, acc@{t_search} {search.accuracy:.4f} "
        f"(baseline {search.baseline['score']:.4f} / {search.baseline['accuracy']:.4f}), "
        f"{len(search.table)} candidates, {search.seconds:.1f} s")
    tuned = convert(model, cal, count_spikes=True, **cfg)
    r1 = run_snn(tuned, x_t, t_max, labels=y_t, return_potentials=True)
    res["tuned"] = _run_summary(tuned, r1, t_max, len(x_t), res["ann_test_accuracy_snn_subset"])
    res["tuned"]["lambdas"] = [_r(v, 5) for v in tuned.info["lambdas"]]
    log(f"[{name}] SNN tuned: " + _fmt_trace(res["tuned"]["accuracy_at"]) + f" ({r1.seconds:.1f} s)")

    # --- Poisson input (rate-coded pixels, seeded) with the tuned thresholds, for comparison
    n_poisson = min(n_poisson, len(x_t))
    if n_poisson:
        pois = convert(model, cal, encoding="poisson", seed=0, **cfg)
        rp = run_snn(pois, x_t[:n_poisson], t_max, labels=y_t[:n_poisson])
        ann_p = _acc(model, x_t[:n_poisson], y_t[:n_poisson])
        tr = [float(v) for v in rp.accuracy_trace]
        res["poisson_tuned"] = {"n_test": n_poisson, "ann_accuracy": _r(ann_p),
                                "accuracy_at": {t: _r(tr[t - 1]) for t in TABLE_T if t <= t_max},
                                "direct_accuracy_at_same_images": {
                                    t: _r((r1.step_predictions[t - 1, :n_poisson] == y_t[:n_poisson])
                                          .double().mean()) for t in TABLE_T if t <= t_max},
                                "first_T_within_1pt_of_ann": _first_within(tr, ann_p - 0.01),
                                "seconds": _r(rp.seconds, 2)}
        log(f"[{name}] SNN tuned, Poisson input ({n_poisson} images): "
            + _fmt_trace(res["poisson_tuned"]["accuracy_at"]))

    # --- run-time early exit: tune on held-out potentials, apply online on the test images
    tuned.reset()
    rv = run_snn(tuned, x_val[:n_ee], t_ref, labels=y_val[:n_ee], return_potentials=True)
    rule, summ = tune_early_exit(rv.potentials, y_val[:n_ee], T=t_ref, max_loss=ee_val_loss,
                                 max_flip=ee_val_flip, flip_z=1.645)
    ee: dict[str, Any] = {"T_cap": t_ref, "tuned_on_heldout": n_ee,
                          "heldout_full_T_accuracy": _r(summ["full_accuracy"]),
                          "heldout_max_loss": ee_val_loss, "heldout_max_flip": ee_val_flip}
    if rule is None:
        ee["rule"] = None
        log(f"[{name}] early exit: no rule within {ee_val_loss} on the held-out split")
    else:
        ee.update(rule=rule.describe(), heldout_accuracy=_r(summ["accuracy"]),
                  heldout_mean_steps=_r(summ["mean_steps"], 2),
                  heldout_flipped=_r(summ["flipped"]),
                  heldout_flipped_upper95=_r(summ["flipped_upper"]))
        re_ = run_snn(tuned, x_t, t_ref, early_exit=rule, labels=y_t)
        full_acc = float(r1.accuracy_trace[t_ref - 1])
        base_acc = float(r0.accuracy_trace[t_ref - 1])
        # the online run must agree with the offline simulation on the recorded test potentials
        sp, su = simulate_early_exit(r1.potentials, rule, t_ref)
        steps = re_.steps_used
        ee.update(
            test_accuracy=_r(re_.accuracy(y_t)),
            test_accuracy_fixed_T_cap=_r(full_acc),
            test_accuracy_baseline_fixed_T_cap=_r(base_acc),
            loss_points_vs_fixed_T_cap=_r(100 * (full_acc - re_.accuracy(y_t)), 2),
            mean_steps_used=_r(re_.mean_steps, 2),
            mean_steps_computed=_r(re_.mean_steps_computed, 2),
            step_cut=_r(t_ref / re_.mean_steps, 2),
            steps_used_quantiles={q: int(torch.quantile(steps.double(), q / 100).item())
                                  for q in (10, 50, 90, 99)},
            steps_used_max=int(steps.max()),
            seconds=_r(re_.seconds, 2),
            fixed_T_cap_seconds_estimate=_r(r1.seconds * t_ref / t_max, 2),
            online_equals_offline=bool(torch.equal(sp, re_.predictions) and torch.equal(su, steps)),
            test_flipped_vs_fixed_T_cap=_r((re_.predictions != r1.step_predictions[t_ref - 1])
                                           .double().mean()),
        )
        # smallest fixed T whose accuracy matches early exit's (a stricter comparison)
        tr = r1.accuracy_trace.tolist()
        t_match = next((t + 1 for t in range(t_max) if tr[t] >= re_.accuracy(y_t) - 1e-12), None)
        ee["smallest_fixed_T_with_same_accuracy"] = t_match
        # the same rule at other caps (offline on the recorded test potentials: identical to online)
        caps = {}
        for cap in TABLE_T:
            if cap <= t_max:
                p, u = simulate_early_exit(r1.potentials, rule, cap)
                caps[cap] = {"accuracy": _r((p == y_t).double().mean()),
                             "mean_steps": _r(u.double().mean(), 2)}
        ee["rule_at_other_caps_offline"] = caps
        log(f"[{name}] early exit ({ee['rule']}): test acc {ee['test_accuracy']:.4f} vs fixed "
            f"T={t_ref} {full_acc:.4f}, mean steps {ee['mean_steps_used']} ({ee['step_cut']}x), "
            f"online==offline {ee['online_equals_offline']}")
    res["early_exit"] = ee
    return res


def _run_summary(snn, r, t_max: int, n: int, ann_acc: float) -> dict:
    tr = [float(v) for v in r.accuracy_trace]
    neurons = snn.neurons
    spikes = sum(m.spike_count for m in neurons)
    ns = sum(m.neuron_steps for m in neurons)
    return {
        "accuracy_at": {t: _r(tr[t - 1]) for t in TABLE_T if t <= t_max},
        "trace": [_r(v) for v in tr],
        "first_T_within_1pt_of_ann": _first_within(tr, ann_acc - 0.01),
        "first_T_within_0.5pt_of_ann": _first_within(tr, ann_acc - 0.005),
        "seconds": _r(r.seconds, 2),
        "us_per_image_step": _r(1e6 * r.seconds / (n * t_max), 1),
        "spikes_per_image_per_step": _r(spikes / (n * t_max), 1),
        "firing_rate": _r(spikes / ns if ns else 0.0, 4),
        "config": {k: snn.info[k] for k in ("percentile", "threshold_scale", "init_potential")},
    }


def _fmt_trace(acc: dict) -> str:
    return ", ".join(f"T={t}: {v:.4f}" for t, v in acc.items())


def _checks(out: dict) -> dict:
    g = {}
    for name, m in out["models"].items():
        ann = m["ann_test_accuracy_snn_subset"]
        for variant in ("baseline", "tuned"):
            t1 = m[variant]["first_T_within_1pt_of_ann"]
            g[f"{name}_{variant}_within_1pt_at_T<=64"] = t1 is not None and t1 <= 64
        ee = m["early_exit"]
        if ee.get("rule"):
            g[f"{name}_early_exit_3x_cut"] = ee["step_cut"] >= 3.0
            g[f"{name}_early_exit_loss<=0.5pt"] = ee["loss_points_vs_fixed_T_cap"] <= 0.5
        else:
            g[f"{name}_early_exit_3x_cut"] = False
        g[f"{name}_ann_test_accuracy"] = ann
    return g


def _markdown(res: dict) -> str:
    m = res.get("machine", {})
    d, c = res["data"], res["config"]
    lines = [
        "# SNN MNIST (kdengine repro snn_mnist)",
        "",
        f"- Machine: {m.get('cpu', '?')}, {c['threads']} torch threads, torch {m.get('torch', '?')}; "
        f"date {m.get('date', '?')}",
        f"- Data: {d['dataset']}; {d['split']}; seed {d['seed']}. SNN numbers on the first "
        f"{d['n_test_snn']} of the {d['n_test_ann']} test images.",
        f"- ANN: conv({c['width']}) avgpool relu, conv({2 * c['width']}) avgpool relu, fc({c['hidden']}) "
        f"relu, fc(10); no bias, no BN, dropout 0.2; float {c['epochs']} epochs, binary-weight "
        f"fine-tuned {c['finetune_epochs']} epochs from the float weights (middle conv + hidden fc "
        "binary, first/last full precision).",
        f"- Conversion: direct encoding, IF threshold 1, reset by subtraction, percentile 99.9 "
        f"(baseline); latency cuts tuned on the held-out split only (scaling search at "
        f"T={c['t_search']}; early exit: fewest mean steps with at most {100 * c['ee_val_loss']:.1f} pt "
        f"accuracy loss and at most {100 * c['ee_val_flip']:.1f} % of decisions changed vs the full "
        f"run (95 % upper confidence limit) on held-out, cap T={c['t_ref']}).",
        f"- Whole run: {res.get('wall_seconds', '?')} s wall, {res.get('cpu_seconds', '?')} s CPU "
        f"(1-min load average {res.get('load_average_1min', {}).get('start', '?')} at start, "
        f"{res.get('load_average_1min', {}).get('end', '?')} at end, {m.get('cores', '?')} cores).",
        "",
        "## Accuracy against time steps (test)",
        "",
        "| model | ANN | SNN variant | " + " | ".join(f"T={t}" for t in TABLE_T if t <= c["t_max"])
        + " | first T within 1 pt | us / image-step |",
        "|---|---|---|" + "---|" * len([t for t in TABLE_T if t <= c["t_max"]]) + "---|---|",
    ]
    for name, r in res["models"].items():
        for variant, label in (("baseline", "p99.9"), ("tuned", "+ scaling search")):
            v = r[variant]
            lines.append(
                f"| {name} | {r['ann_test_accuracy_snn_subset']:.4f} | {label} | "
                + " | ".join(f"{a:.4f}" for a in v["accuracy_at"].values())
                + f" | {v['first_T_within_1pt_of_ann']} | {v['us_per_image_step']} |")
    lines += ["", "## Early exit (test; rule tuned on the held-out split)", "",
              "| model | rule | cap T | fixed-T acc (tuned) | fixed-T acc (p99.9) | early-exit acc | loss (pt) "
              "| decisions changed | mean steps | cut | p50 / p90 / max steps | smallest fixed T with same acc "
              "| online == offline |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        ee = r["early_exit"]
        if not ee.get("rule"):
            lines.append(f"| {name} | none qualified | {ee['T_cap']} | | | | | | | | | | |")
            continue
        q = ee["steps_used_quantiles"]
        lines.append(
            f"| {name} | {ee['rule']} | {ee['T_cap']} | {ee['test_accuracy_fixed_T_cap']:.4f} | "
            f"{ee['test_accuracy_baseline_fixed_T_cap']:.4f} | {ee['test_accuracy']:.4f} | "
            f"{ee['loss_points_vs_fixed_T_cap']} | {100 * ee['test_flipped_vs_fixed_T_cap']:.1f} % | "
            f"{ee['mean_steps_used']} | {ee['step_cut']}x | "
            f"{q[50]} / {q[90]} / {ee['steps_used_max']} | {ee['smallest_fixed_T_with_same_accuracy']} | "
            f"{ee['online_equals_offline']} |")
    for name, r in res["models"].items():
        p = r.get("poisson_tuned")
        if p:
            lines += ["", f"## Poisson input ({name}, tuned thresholds, first {p['n_test']} test images)",
                      "", "| input | " + " | ".join(f"T={t}" for t in p["accuracy_at"]) + " | first T within 1 pt |",
                      "|---|" + "---|" * (len(p["accuracy_at"]) + 1),
                      "| Poisson (seed 0) | " + " | ".join(f"{v:.4f}" for v in p["accuracy_at"].values())
                      + f" | {p['first_T_within_1pt_of_ann']} |",
                      "| direct (analog) | " + " | ".join(
                          f"{v:.4f}" for v in p["direct_accuracy_at_same_images"].values()) + " | |",
                      f"| ANN | {p['ann_accuracy']:.4f} |" + " |" * len(p["accuracy_at"])]
    lines += ["", "## Details", ""]
    for name, r in res["models"].items():
        s = r["search"]
        lines.append(f"- {name}: ANN test {r['ann_test_accuracy']:.4f} (all {d['n_test_ann']}), "
                     f"held-out {r['ann_heldout_accuracy']:.4f}; search best {s['config']} "
                     f"(held-out mean acc over steps {s['T'] // 2 + 1}..{s['T']}: "
                     f"{s['heldout_score_mean_acc_last_half']:.4f} vs baseline "
                     f"{s['heldout_baseline']['score']:.4f}, {s['evaluations']} candidates, "
                     f"{s['seconds']} s); lambdas p99.9 {r['baseline']['lambdas']}, tuned "
                     f"{r['tuned']['lambdas']}; spikes/image/step {r['baseline']['spikes_per_image_per_step']}"
                     f" -> {r['tuned']['spikes_per_image_per_step']}")
        ee = r["early_exit"]
        if ee.get("rule"):
            lines.append("  early exit, same rule at other caps (offline on recorded potentials): "
                         + ", ".join(f"T={k}: acc {v['accuracy']:.4f}, {v['mean_steps']} steps"
                                     for k, v in ee["rule_at_other_caps_offline"].items()))
        lines.append(f"  layers: {'; '.join(r['layers'])}")
        if r["notes"]:
            lines.append(f"  notes: {'; '.join(r['notes'])}")
    lines += ["", "## Checks", ""] + [f"- {k}: {v}" for k, v in res["checks"].items()] + [""]
    return "\n".join(lines)


def _figure(res: dict) -> Any:
    """Accuracy against time steps of every SNN variant, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"float": "tab:blue", "binary": "tab:red"}
    for name, r in res["models"].items():
        col = colors.get(name, None)
        for variant, ls, label in (("baseline", ":", "SNN p99.9"), ("tuned", "-", "SNN + scaling search")):
            tr = r[variant]["trace"]
            ax.plot(range(1, len(tr) + 1), [100 * v for v in tr], ls, color=col, label=f"{name} {label}")
        ax.axhline(100 * r["ann_test_accuracy_snn_subset"], color=col, ls="--", lw=0.8,
                   label=f"{name} ANN")
        ee = r["early_exit"]
        if ee.get("rule"):
            ax.plot([ee["mean_steps_used"]], [100 * ee["test_accuracy"]], "*", color=col, ms=12,
                    label=f"{name} + early exit (mean steps, cap {ee['T_cap']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("time steps T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(80, 100)
    ax.grid(alpha=0.3)
    ax.set_title("MNIST: converted SNNs, accuracy vs time steps")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


@register("snn_mnist", "float and binary-weight CNNs converted to SNNs: accuracy vs time steps, scaling "
                       "search and early exit", minutes=3, quick_minutes=0.5,
          seeds=(0,), record_subdir="", threads=2)
def entry(args: ReproArgs) -> dict:
    clock = RunClock()
    res = run(args.quick, seed=args.seeds[0])
    # run() times itself (without the result files); keep its wall/CPU seconds
    wall, cpu = res["wall_seconds"], res["cpu_seconds"]
    clock.stamp(res)
    res["wall_seconds"], res["cpu_seconds"] = wall, cpu
    md = _markdown(res)
    files: dict[str, Any] = {"snn_mnist.json": to_json(res), "snn_mnist.md": md}
    fig = _figure(res)
    if fig is not None:
        files["snn_mnist.png"] = save_figure(fig, dpi=120)
    return {"table": md, "paths": write_files(args.out_dir, files)}
