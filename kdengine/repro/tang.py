"""``kdengine repro tang``: Tang et al., "Understanding and Improving KD" (docs/papers.md section 2).

Students trained alone (CE), with label smoothing (universe level), vanilla KD, the partial teacher
(instance level only), the class-similarity teacher (domain level only) and both combined; the
definitions are those of :mod:`kdengine.methods.tang`. All variants use
``0.5 CE + 0.5 T^2 CE(targets, softmax(z/T))`` with T = 2 for the teacher-logit variants (KD,
partial teacher, partial + similarity) and T = 1 for label smoothing (eps = 0.1, so an effective
smoothing of 0.05) and the class-similarity teacher (tau = 0.1). No hyper-parameter was tuned per
method.

Data:
* synthetic: Gaussian mixture, 20 classes in 5 groups of 4 (:mod:`kdengine.data.synthetic`,
  dim 32, class_scale 0.5, noise 1), a fresh draw per seed; the student sees 25 examples per class
  (500), the teacher (MLP 32-128-128-20) is trained on those plus 200 more per class; test 200 per
  class. Student: MLP 32-32-20, Adam lr 3e-3, 60 epochs, batch 100.
* MNIST: the project split (8,000 / 2,000 of the official test images); teacher CNN
  conv16-conv32-fc128 trained once (seed 1000, 3 epochs); student MLP 784-32-10, SGD momentum 0.9,
  lr 0.05, cosine, 10 epochs, batch 128.

Diagnostic: the instance-level gradient-rescaling weight w = 1 - a (1 - p_c) / (1 - q_c) (a = 0.5,
T = 1 teacher p_c, q_c of the fully trained CE-only student on the test images), median per
teacher-confidence bin, and checked against autograd on the same examples.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from kdengine.data.synthetic import gaussian_mixture
from kdengine.methods import tang as TG
from kdengine.repro import ReproArgs, register
from kdengine.models import mlp, small_cnn
from kdengine.repro.common import (compare_to, kd_backend, mean_std, mnist_note, mnist_split, predict_logits,
                                   summarize, train_model, write_results)
from kdengine.train import CrossEntropyTerm

VARIANT_LABELS = {
    "ce": "CE (student alone)",
    "ls": "label smoothing",
    "kd": "KD (vanilla)",
    "pt": "partial teacher",
    "sim": "class-similarity teacher",
    "pt+sim": "partial + similarity",
}
ALPHA, T, EPS, TAU = 0.5, 2.0, 0.1, 0.1
TEACHER_SEED = 1000


def _student_runs(dataset: str, seed: int, make_student, train, test, teacher_logits, sim, train_kw,
                  rows: list) -> dict[str, torch.nn.Module]:
    c = int(teacher_logits.shape[1])
    models = {}
    for variant, label in VARIANT_LABELS.items():
        torch.manual_seed(seed)
        st = make_student()
        terms = TG.make_terms(variant, alpha=ALPHA, num_classes=c, eps=EPS, temperature=T, sim_dist=sim)
        r = train_model(st, train, terms, test=test, teacher=teacher_logits, seed=seed, **train_kw)
        rows.append({"dataset": dataset, "method": label, "seed": seed, "test_acc": r["test_acc"],
                     "train_acc": r["train_acc"], "time_s": r["time_s"]})
        models[variant] = st
    return models


def _diagnostic(student: torch.nn.Module, x: torch.Tensor, teacher_logits_test: torch.Tensor,
                y: torch.Tensor, device: str) -> dict[str, Any]:
    z = predict_logits(student, x, device=device).cpu().double()
    p = torch.softmax(teacher_logits_test.double(), -1)
    w = TG.rescaling_weight_from_logits(z, p, y, ALPHA)
    w_auto = TG.true_class_gradient_ratio(z, p, y, ALPHA)
    ok = torch.isfinite(w)
    pc = p.gather(1, y[:, None]).squeeze(1)
    bins = {}
    for lo, hi, name in ((0.0, 0.5, "p_c < 0.5"), (0.5, 0.9, "0.5 <= p_c < 0.9"), (0.9, 1.01, "p_c >= 0.9")):
        m = ok & (pc >= lo) & (pc < hi)
        bins[name] = (int(m.sum()), float(w[m].median()) if m.any() else float("nan"))
    return {"bins": bins, "neg_share": float((w[ok] < 0).double().mean()),
            "max_autograd_diff": float((w[ok] - w_auto[ok]).abs().max()),
            "corr": float(torch.corrcoef(torch.stack([w[ok], pc[ok]]))[0, 1])}


def _plot(fig: Any, summ: list[dict], ref: list[dict]) -> None:
    """One panel per dataset: student methods as bars (std error bars), references as lines."""
    datasets = list(dict.fromkeys(e["dataset"] for e in summ))
    axes = fig.subplots(1, len(datasets))
    axes = axes if len(datasets) > 1 else [axes]
    for ax, ds in zip(axes, datasets):
        es = [e for e in summ if e["dataset"] == ds]
        m = [e["test_acc_mean"] * 100 for e in es]
        sd = [e["test_acc_std"] * 100 for e in es]
        ax.bar(range(len(es)), m, yerr=sd, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(es)))
        ax.set_xticklabels([e["method"] for e in es], rotation=35, ha="right", fontsize=7)
        lo, hi = min(a - b for a, b in zip(m, sd)), max(a + b for a, b in zip(m, sd))
        for e, style in zip([r for r in ref if r["dataset"] == ds], ("--", ":")):
            y = e["test_acc_mean"] * 100
            ax.axhline(y, ls=style, color="k", lw=0.8, label=e["method"])
            hi = max(hi, y)
        pad = max(hi - lo, 1.0) * 0.1
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title(f"{ds}: student test accuracy (%)", fontsize=9)
        ax.legend(fontsize=7, loc="best")


@register("tang", "Tang et al.: label smoothing, partial / class-similarity teachers, gradient "
                  "rescaling (synthetic + MNIST; docs/papers.md section 2)",
          minutes=3, quick_minutes=0.2, threads=1)
def run(args: ReproArgs) -> dict[str, Any]:
    dev = args.device
    rows: list[dict[str, Any]] = []
    diag: dict[str, list[dict]] = {"synthetic": [], "MNIST": []}
    q = args.quick

    # ------------------------------------------------------------- synthetic
    syn_cfg = dict(n_classes=20, n_groups=5, dim=32, class_scale=0.5, noise_scale=1.0)
    n_student_pc, n_teacher_extra_pc = 25, 200
    for seed in args.seeds:
        data = gaussian_mixture(**syn_cfg, n_train_per_class=n_student_pc + n_teacher_extra_pc,
                                n_test_per_class=50 if q else 200, seed=10_000 + seed)
        n_s = n_student_pc * syn_cfg["n_classes"]
        # the draw is shuffled: the first n_s examples are the student's set (about 25 per class)
        xs, ys = data.x_train[:n_s], data.y_train[:n_s]
        torch.manual_seed(TEACHER_SEED + seed)
        teacher = mlp(32, [128, 128], 20)
        train_model(teacher, data.train, [CrossEntropyTerm()], epochs=5 if q else 20, lr=3e-3,
                    batch_size=100, seed=seed, device=dev, optimizer="adam")
        v_s = predict_logits(teacher, xs, device=dev).cpu()
        v_te = predict_logits(teacher, data.x_test, device=dev).cpu()
        rows.append({"dataset": "synthetic", "method": "teacher (reference)", "seed": seed,
                     "test_acc": float((v_te.argmax(-1) == data.y_test).float().mean())})
        bayes = float((data.bayes_logits(data.x_test).argmax(-1) == data.y_test).float().mean())
        rows.append({"dataset": "synthetic", "method": "Bayes classifier (reference)", "seed": seed,
                     "test_acc": bayes})
        sim = TG.class_similarity_distribution(TG.logit_layer(teacher).weight, tau=TAU)
        models = _student_runs(
            "synthetic", seed, lambda: mlp(32, [32], 20), (xs, ys), data.test, v_s, sim,
            dict(epochs=10 if q else 60, lr=3e-3, batch_size=100, device=dev, optimizer="adam"),
            rows)
        diag["synthetic"].append(_diagnostic(models["ce"], data.x_test, v_te, data.y_test, dev))

    # ------------------------------------------------------------- MNIST
    (xtr, ytr), (xte, yte) = mnist_split(seed=0, n_train=8000)
    if q:
        xtr, ytr = xtr[:1000], ytr[:1000]
    torch.manual_seed(TEACHER_SEED)
    teacher = small_cnn(channels=(16, 32), hidden=128)
    t_r = train_model(teacher, (xtr, ytr), [CrossEntropyTerm()], test=(xte, yte), epochs=1 if q else 3,
                      lr=0.05, batch_size=64, seed=TEACHER_SEED, device=dev)
    v_tr = predict_logits(teacher, xtr, device=dev).cpu()
    v_te = predict_logits(teacher, xte, device=dev).cpu()
    sim = TG.class_similarity_distribution(TG.logit_layer(teacher).weight, tau=TAU)
    for seed in args.seeds:
        rows.append({"dataset": "MNIST", "method": "teacher (reference)", "seed": seed, "test_acc": t_r["test_acc"]})
        models = _student_runs(
            "MNIST", seed, lambda: mlp(784, [32], 10), (xtr, ytr), (xte, yte), v_tr, sim,
            dict(epochs=2 if q else 10, lr=0.05, batch_size=128, device=dev), rows)
        diag["MNIST"].append(_diagnostic(models["ce"], xte, v_te, yte, dev))

    # ------------------------------------------------------------- report
    student_rows = [r for r in rows if "reference" not in r["method"]]
    summ = summarize(student_rows, ("dataset", "method"), ("test_acc",))
    notes = compare_to(summ, baseline=VARIANT_LABELS["kd"])
    notes += compare_to(summ, baseline=VARIANT_LABELS["ce"])
    if q:
        notes.append("QUICK run (small data, few epochs): not for reporting")
    lines = ["Instance-level diagnostic: w = 1 - a (1 - p_c) / (1 - q_c), a = 0.5, teacher p_c at T = 1, "
             "q_c of the fully trained CE-only student, test images; median w per teacher-confidence bin "
             "(count), averaged over seeds; w < 0 where the student is more confident than the teacher "
             "(1 - q_c < a (1 - p_c)): the soft term then pulls the true logit down:", "",
             "| dataset | p_c < 0.5 | 0.5 <= p_c < 0.9 | p_c >= 0.9 | share w < 0 | corr(w, p_c) | "
             "max abs(w - autograd ratio) |", "|---|---|---|---|---|---|---|"]
    for ds, ds_diag in diag.items():
        if not ds_diag:
            continue
        cells = []
        for b in ("p_c < 0.5", "0.5 <= p_c < 0.9", "p_c >= 0.9"):
            n = sum(d["bins"][b][0] for d in ds_diag) / len(ds_diag)
            vals = [d["bins"][b][1] for d in ds_diag if d["bins"][b][0] > 0]
            cells.append(f"{mean_std(vals)[0]:.3f} ({n:.0f})" if vals else "–")
        corr = mean_std([d["corr"] for d in ds_diag])
        mx = max(d["max_autograd_diff"] for d in ds_diag)
        neg = mean_std([d["neg_share"] for d in ds_diag])[0]
        lines.append(f"| {ds} | " + " | ".join(cells) + f" | {neg:.2f} | {corr[0]:.3f} ± {corr[1]:.3f} | {mx:.1e} |")
    lines.append("")
    ref_rows = [r for r in rows if "reference" in r["method"]]
    ref = summarize(ref_rows, ("dataset", "method"), ("test_acc",))
    lines.append("References: " + "; ".join(
        f"{e['dataset']} {e['method']}: {e['test_acc_mean'] * 100:.2f} ± {e['test_acc_std'] * 100:.2f} %" for e in ref))
    wall = time.perf_counter() - args.started
    setup = {"alpha (soft weight)": ALPHA, "T (kd, pt, pt+sim; ls and sim use 1)": T, "label smoothing eps": EPS,
             "class-similarity tau": TAU, "synthetic": f"{syn_cfg}, student {n_student_pc}/class, teacher "
             f"+{n_teacher_extra_pc}/class, student MLP 32-32-20 Adam 3e-3 60 epochs",
             "MNIST": "teacher CNN 16-32-fc128 3 epochs; student MLP 784-32-10 SGD 0.9 lr 0.05 10 epochs",
             "threads": 1, "kd_loss backend": kd_backend(dev)}
    res = write_results(
        "tang", rows, args.out_dir,
        title="Understanding and Improving KD (Tang et al. 2020; docs/papers.md §2): which level of "
              "teacher knowledge helps",
        group_by=("dataset", "method"), metrics=("test_acc", "train_acc"),
        labels={"test_acc": "test acc (%)", "train_acc": "train acc (%)"},
        scale={"test_acc": 100.0, "train_acc": 100.0},
        data_note=("synthetic Gaussian mixture (kdengine.data.synthetic, seed 10000 + run seed); "
                   + mnist_note(0, 1000 if q else 8000)),
        notes=notes, setup=setup, extra_md="\n".join(lines), plot=lambda fig, _s: _plot(fig, summ, ref),
        wall_s=wall, seeds=args.seeds)
    res["table"] = res["table"] + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes)
    return res
