"""``kdengine repro tinf``: KD as logits matching, the T -> inf story (docs/papers.md section 1).

On the project's MNIST split (8,000 train / 2,000 test of the official test images):

1. teacher: a small CNN trained with CE (seed 1000, shared by all seeds), then
   ``equal_mean_init_`` on its logit layer (its softmax outputs are unchanged; its logit mean
   becomes 0 for every input);
2. gradient gap: for each seed, a fresh student MLP's logits z and the teacher's v on 512 test
   images; max-abs gap between the autograd gradient of ``kd_loss(z, v, T)`` and the logits-matching
   limit for T = 1 ... 1000; fitted log-log slope over T >= 10 (theory: -1);
3. conservation: the logit layer's class-mean row and mean bias after 100 minibatch steps from the
   default (non-equal-mean) init, under CE, KD (T = 4), plain MSE logits matching, with SGD+momentum
   and with Adam;
4. tracking: full-batch SGD on 512 training images, KD at T in {10, ..., 10^4} vs plain MSE
   logits matching from the same init, with equal-mean init and with PyTorch's default init:
   max-abs difference of the resulting logits;
5. accuracy: a student MLP 784-64-10 with equal-mean init, 10 epochs (SGD momentum 0.9, lr 0.05,
   cosine, batch 128), alone (CE) and with 0.5 CE + 0.5 x {KD T=4 (vanilla), KD T=100,
   KD T=inf, plain MSE logits matching}; 3 seeds.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

import kdengine
from kdengine.methods import logit_limit as L
from kdengine.repro import ReproArgs, register
from kdengine.models import logit_layer
from kdengine.models import mlp, small_cnn
from kdengine.repro.common import (compare_to, kd_backend, mean_std, mnist_note, mnist_split, predict_logits,
                                   summarize, train_model, write_results)
from kdengine.train import CrossEntropyTerm, KDTerm, LogitsMatchingTerm

TEACHER_SEED = 1000
GAP_TS = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
TRACK_TS = [10.0, 100.0, 1000.0, 10000.0]
TRACK_LR = 0.02
SLOPE_FROM_T = 100.0
METHODS = ["CE (student alone)", "KD T=4 (vanilla)", "KD T=100", "KD T=inf", "logits matching (MSE)"]
BASELINE = "KD T=4 (vanilla)"


def _losses(method: str) -> list:
    ce = CrossEntropyTerm()
    if method == METHODS[0]:
        return [ce]
    if method == METHODS[1]:
        return [(0.5, ce), (0.5, KDTerm(4.0))]
    if method == METHODS[2]:
        return [(0.5, ce), (0.5, KDTerm(100.0))]
    if method == METHODS[3]:
        return [(0.5, ce), (0.5, KDTerm(math.inf))]
    return [(0.5, ce), (0.5, LogitsMatchingTerm())]


def _student(seed: int, hidden: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return mlp(784, [hidden], 10)


@register("tinf", "KD as logits matching: 1/T gradient gap, conserved class mean, equal-mean init "
                  "(MNIST; docs/papers.md section 1)",
          minutes=3.5, quick_minutes=0.4, threads=1)
def run(args: ReproArgs) -> dict[str, Any]:
    dev = args.device
    (xtr, ytr), (xte, yte) = mnist_split(seed=0, n_train=8000)
    if args.quick:
        xtr, ytr = xtr[:1000], ytr[:1000]
    cfg = dict(teacher="CNN conv16-conv32-fc128 (CE, SGD 0.9, lr 0.05, cosine, batch 64)",
               teacher_epochs=1 if args.quick else 3,
               student="MLP 784-64-10, equal-mean init (zero-mean logit layer)",
               student_epochs=2 if args.quick else 10, student_lr=0.05, batch_size=128,
               kd_weight="0.5 CE + 0.5 distillation term", threads=1,
               kd_loss_backend=kd_backend(dev))

    # ---- teacher
    torch.manual_seed(TEACHER_SEED)
    teacher = small_cnn(channels=(16, 32), hidden=128)
    tr = train_model(teacher, (xtr, ytr), [CrossEntropyTerm()], test=(xte, yte),
                     epochs=cfg["teacher_epochs"], lr=0.05, batch_size=64, seed=TEACHER_SEED, device=dev)
    p_before = torch.softmax(predict_logits(teacher, xte[:256], device=dev), -1)
    kdengine.equal_mean_init_(logit_layer(teacher), target_mean=0.0)
    v_tr = predict_logits(teacher, xtr, device=dev).cpu()
    v_te = predict_logits(teacher, xte, device=dev).cpu()
    softmax_change = float((torch.softmax(v_te[:256], -1) - p_before.cpu()).abs().max())
    teacher_acc = float((v_te.argmax(-1) == yte).float().mean())

    rows: list[dict[str, Any]] = []
    gap_rows: list[list[float]] = []
    slopes: list[float] = []
    track: dict[bool, list[list[float]]] = {True: [], False: []}
    cons: dict[tuple[str, str], list[float]] = {}
    n_probe = 512
    for seed in args.seeds:
        # ---- gradient gap on real logits (float64)
        s = _student(seed, 64)
        kdengine.equal_mean_init_(logit_layer(s))
        with torch.no_grad():
            z = s(xte[:n_probe]).double()
        gaps = L.gradient_gap(z, v_te[:n_probe].double(), GAP_TS)
        gap_rows.append(gaps)
        big = [i for i, t in enumerate(GAP_TS) if t >= SLOPE_FROM_T]
        slopes.append(L.loglog_slope([GAP_TS[i] for i in big], [gaps[i] for i in big]))

        # ---- conservation from the default init (not equal-mean)
        for loss_name, loss in (("CE", L.loss_fn("ce")), ("KD T=4", L.loss_fn("kd", 4.0)),
                                ("MSE", L.loss_fn("mse"))):
            for opt in ("sgd", "adam"):
                m = _student(seed, 64)
                r = L.conservation_run(m, xtr, ytr, loss, teacher_logits=v_tr, steps=20 if args.quick else 100,
                                       lr=0.05 if opt == "sgd" else 1e-3, momentum=0.9 if opt == "sgd" else 0.0,
                                       optimizer=opt, batch_size=128, seed=seed)
                cons.setdefault((loss_name, opt), []).append(max(r["w_drift"], r["b_drift"]))

        # ---- tracking: high-T KD vs plain MSE logits matching
        # float64: the differences measured reach 1e-4 and training amplifies rounding noise
        s0 = _student(seed, 64).double()
        for eq in (True, False):
            tr_r = L.tracking_run(s0, v_tr[:n_probe].double(), xtr[:n_probe].double(), TRACK_TS,
                                  steps=20 if args.quick else 60, lr=TRACK_LR, equal_mean=eq)
            track[eq].append(tr_r["gap"])

        # ---- accuracy
        for method in METHODS:
            st = _student(seed, 64)
            kdengine.equal_mean_init_(logit_layer(st))
            w0, b0 = L.class_mean(logit_layer(st))
            r = train_model(st, (xtr, ytr), _losses(method), test=(xte, yte),
                            teacher=None if method == METHODS[0] else v_tr,
                            epochs=cfg["student_epochs"], lr=cfg["student_lr"],
                            batch_size=cfg["batch_size"], seed=seed, device=dev)
            w1, b1 = L.class_mean(logit_layer(st))
            drift = max(float((w1 - w0).abs().max()), float((b1 - b0).abs()))
            rows.append({"dataset": "MNIST", "method": method, "seed": seed,
                         "test_acc": r["test_acc"], "train_acc": r["train_acc"],
                         "class_mean_drift": drift, "time_s": r["time_s"]})

    # ---- tables
    gap_lines = ["Gradient gap max|d/dz kd_loss(z,v,T) - limit| on 512 test images (float64, "
                 "student at init vs teacher), mean ± std over seeds:", "",
                 "| T | " + " | ".join(f"{t:g}" for t in GAP_TS) + " |",
                 "|---|" + "---|" * len(GAP_TS),
                 "| gap | " + " | ".join(
                     "{:.3g} ± {:.1g}".format(*mean_std([g[i] for g in gap_rows])) for i in range(len(GAP_TS))) + " |",
                 "| T × gap | " + " | ".join(
                     "{:.3g}".format(mean_std([g[i] for g in gap_rows])[0] * GAP_TS[i])
                     for i in range(len(GAP_TS))) + " |",
                 "", "Log-log slope for T >= {:g}: {:.3f} ± {:.3f} (theory: -1). The 1/T regime starts once T "
                 "is well above the logit scale (teacher logits: std {:.1f}, max |v| {:.1f}).".format(
                     SLOPE_FROM_T, *mean_std(slopes), float(v_te.std()), float(v_te.abs().max())), ""]
    cons_lines = ["Class-mean drift of the logit layer (max |Δ mean row|, |Δ mean bias|) after "
                  f"{20 if args.quick else 100} minibatch steps from PyTorch's default init:", "",
                  "| loss | SGD (momentum 0.9) | Adam |", "|---|---|---|"]
    for loss_name in ("CE", "KD T=4", "MSE"):
        cons_lines.append(f"| {loss_name} | " + " | ".join(
            "{:.2e} ± {:.1e}".format(*mean_std(cons[(loss_name, o)])) for o in ("sgd", "adam")) + " |")
    cons_lines.append("")
    track_lines = ["Tracking: max |logits(KD at T) - logits(plain MSE logits matching)| after "
                   f"{20 if args.quick else 60} full-batch SGD steps (lr {TRACK_LR}, float64) on 512 training images, "
                   "same student init; 'equal-mean' applies equal_mean_init_ to the student "
                   "(the teacher's logit mean is 0 for every input):", "",
                   "| init | " + " | ".join(f"T={t:g}" for t in TRACK_TS) + " |", "|---|" + "---|" * len(TRACK_TS)]
    for eq, label in ((True, "equal-mean"), (False, "PyTorch default")):
        track_lines.append(f"| {label} | " + " | ".join(
            "{:.3g} ± {:.1g}".format(*mean_std([g[i] for g in track[eq]])) for i in range(len(TRACK_TS))) + " |")
    track_lines.append("")

    summ = summarize(rows, ("dataset", "method"), ("test_acc",))
    notes = compare_to(summ, baseline=BASELINE)
    by = {(r["method"], r["seed"]): r["test_acc"] for r in rows}
    same = all(by[(METHODS[3], s)] == by[(METHODS[4], s)] for s in args.seeds)
    notes.append(f"KD T=inf and plain MSE logits matching (both from equal-mean init) give "
                 f"{'the same' if same else 'different'} test accuracy on every seed"
                 + ("" if same else ": " + ", ".join(f"seed {s}: {by[(METHODS[3], s)]:.4f} vs {by[(METHODS[4], s)]:.4f}"
                                                     for s in args.seeds)))
    notes.append(f"max class-mean drift over all accuracy runs (equal-mean init, SGD): "
                 f"{max(r['class_mean_drift'] for r in rows):.2e}")
    notes.append(f"teacher test accuracy {teacher_acc * 100:.2f} % (train time {tr['time_s']:.0f} s); "
                 f"equal_mean_init_ changed its softmax by at most {softmax_change:.1e}")
    if args.quick:
        notes.append("QUICK run (1,000 training images, few epochs): not for reporting")

    def plot(fig, summary):
        import numpy as np

        ax1, ax2, ax3 = fig.subplots(1, 3)
        gm = np.array(gap_rows).mean(0)
        ax1.loglog(GAP_TS, gm, "o-", label="KD gradient gap")
        ax1.loglog(GAP_TS, gm[-1] * GAP_TS[-1] / np.array(GAP_TS), "k--", lw=0.8, label="∝ 1/T")
        ax1.set_xlabel("T")
        ax1.set_title("gap to logits matching", fontsize=9)
        ax1.legend(fontsize=7)
        for eq, lab in ((True, "equal-mean init"), (False, "default init")):
            ax2.loglog(TRACK_TS, np.array(track[eq]).mean(0), "o-", label=lab)
        ax2.set_xlabel("T")
        ax2.set_title("|KD_T - MSE| logits after training", fontsize=9)
        ax2.legend(fontsize=7)
        means = [e["test_acc_mean"] * 100 for e in summary]
        stds = [e["test_acc_std"] * 100 for e in summary]
        ax3.bar(range(len(summary)), means, yerr=stds, capsize=3)
        ax3.set_xticks(range(len(summary)))
        ax3.set_xticklabels([e["method"] for e in summary], fontsize=7, rotation=35, ha="right")
        lo = min(m - s for m, s in zip(means, stds))
        ax3.set_ylim(lo - 1, max(means) + 1)
        ax3.set_title("MNIST student test acc (%)", fontsize=9)

    wall = time.perf_counter() - args.started
    res = write_results(
        "tinf", rows, args.out_dir,
        title="KD as logits matching: the T -> inf limit (Chen, Wang, Chen 2021; docs/papers.md §1)",
        group_by=("dataset", "method"), metrics=("test_acc", "train_acc", "class_mean_drift"),
        labels={"test_acc": "test acc (%)", "train_acc": "train acc (%)",
                "class_mean_drift": "class-mean drift"},
        scale={"test_acc": 100.0, "train_acc": 100.0}, data_note=mnist_note(0, 8000 if not args.quick else 1000),
        notes=notes, setup=cfg, extra_md="\n".join(gap_lines + cons_lines + track_lines),
        plot=plot, wall_s=wall, seeds=args.seeds,
    )
    res["table"] = res["table"] + "\n\n" + "\n".join(gap_lines + cons_lines + track_lines) + "\n" + "\n".join(notes)
    return res
