"""``kdengine repro metadistil``: MetaDistil (Zhou, Xu & McAuley, ACL 2022; docs/papers.md s5).

The claim tested: a teacher meta-learned from the student's quiz performance gives a better student
than vanilla KD from a fixed teacher.

Fashion-MNIST (:func:`kdengine.repro.common.fashion_split`: teacher_train = official 60k less 5k
val, a fixed 10k student subset of it, val, official 10k test):

* teacher: MLP 784-256-256-10, trained once per run on all of teacher_train (seed 1000, SGD
  momentum 0.9, lr 0.05, cosine); an MLP rather than a CNN so that the second-order meta-gradient
  stays cheap on a CPU;
* quiz set: a seeded 1,000 of the 10k student subset (:func:`~kdengine.methods.metadistil.quiz_split`,
  9:1, as in the paper), never val or test;
* students: MLP 784-64-10, SGD momentum 0.9, cosine per epoch, batch 128; every arm on the same
  seeds with the same initialisation per seed.

Arms:

* ``CE (student alone)`` and ``KD (vanilla)``: all 10k student images, the pre-trained teacher
  fixed (the baselines get the quiz images as training data);
* ``KD, quiz held out``: the MetaDistil loop on the 9k with the teacher never updated: the same
  data, batches and code path as MetaDistil, so the difference to MetaDistil is the meta updates
  alone;
* ``MetaDistil``: :class:`~kdengine.methods.metadistil.MetaDistil` on the 9k with the released
  schedule: teacher frozen for the first 62.5 % of the steps, then one meta update per step (Adam on
  the teacher, meta-gradient norm clipped to 1), the pilot step at the student's current (decaying)
  learning rate.

Tuning on val only: T and a of vanilla KD (2 x 2 grid, shared by every KD-style arm), then the
teacher's meta learning rate of MetaDistil (4 values), each scored by the mean val accuracy of the
tuning seeds (100, 101), which are not run seeds.
"""
from __future__ import annotations

import copy
import itertools
import time
from typing import Any, Callable

import torch

from kdengine.methods.metadistil import MetaDistil, quiz_split
from kdengine.models import mlp
from kdengine.repro import ReproArgs, register
from kdengine.repro.common import (paired_table, fashion_note, fashion_split, kd_backend, mean_std, predict_logits,
                                   train_model, write_results)
from kdengine.repro.stats import claim_notes
from kdengine.train import CrossEntropyTerm, KDTerm, evaluate
from kdengine.train.distiller import global_batches

FASHION = "Fashion-MNIST"
TEACHER_SEED, SPLIT_SEED, N_VAL = 1000, 0, 5000
GRID_T, GRID_ALPHA, GRID_META_LR, TUNE_SEEDS = (2.0, 4.0), (0.5, 0.9), (1e-5, 1e-4, 1e-3, 1e-2), (100, 101)
FULL = dict(teacher_hidden=(256, 256), teacher_epochs=4, teacher_lr=0.05, student_hidden=64,
            student_epochs=12, lr=0.05, batch_size=128, quiz_fraction=0.1, teacher_frozen_fraction=0.625,
            teacher_clip=1.0)
QUICK = dict(FULL, teacher_epochs=3, student_epochs=3)
QUICK_SIZES = (3000, 2000, 1000, 2000)   # teacher_train, student_train, val, test
ARMS = {"ce": "CE (student alone)", "kd": "KD (vanilla)", "kd_heldout": "KD, quiz held out",
        "md": "MetaDistil"}

DEPARTURES = [
    "dataset and models: Fashion-MNIST with an MLP teacher (784-256-256-10) and an MLP student (784-64-10); "
    "the paper distils BERT models (GLUE) and deep CNNs on image benchmarks",
    "epochs: teacher 4, students 12 (cosine per epoch), far shorter than the paper's schedules",
    "the students train on a fixed 10k subset of the teacher's training images (fashion_split), the quiz set "
    "is 1k of those 10k; the paper splits the full training set 9:1",
    "one teacher per run (seed 1000): the paired intervals cover student seeds only",
    "teacher meta optimiser Adam with the meta-gradient norm clipped to 1 (our choice, not matched to the "
    "released code); the pilot step is a plain SGD step at the student's current learning rate, without "
    "replaying the student's momentum (our choice)",
    "search: 2 x 2 grid of T and a for vanilla KD (then shared by every KD-style arm) and 4 teacher meta "
    "learning rates for MetaDistil, on val with 2 tuning seeds; the student recipe (SGD, lr 0.05, epochs) "
    "and the frozen fraction 0.625 are not tuned; the last epoch is reported (no early stopping)",
    "the teacher is meta-updated on every step after the frozen phase, with one quiz batch (128) per step",
]


def _kd_terms(alpha: float, temperature: float) -> list:
    return [(1.0 - alpha, CrossEntropyTerm()), (alpha, KDTerm(temperature))]


def metadistil_student(student: torch.nn.Module, teacher: torch.nn.Module, train, quiz, *, cfg: dict,
                       seed: int, alpha: float, temperature: float, meta_lr: float,
                       frozen_fraction: float) -> dict[str, Any]:
    """Train ``student`` (and meta-update ``teacher`` in place) with the released schedule;
    ``frozen_fraction`` = 1 never updates the teacher (plain KD in the same loop)."""
    (x, y), (xq, yq) = train, quiz
    epochs, bs = cfg["student_epochs"], cfg["batch_size"]
    s_opt = torch.optim.SGD(student.parameters(), lr=cfg["lr"], momentum=0.9)
    t_opt = torch.optim.Adam(teacher.parameters(), lr=meta_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(s_opt, T_max=epochs)
    per_epoch = [global_batches(x.shape[0], bs, seed, ep) for ep in range(epochs)]
    md = MetaDistil(student, teacher, s_opt, t_opt, alpha=alpha, temperature=temperature,
                    teacher_clip=cfg["teacher_clip"], teacher_frozen_fraction=frozen_fraction,
                    total_steps=sum(len(b) for b in per_epoch))
    # quiz batches from their own generator so the training batches match the KD-held-out arm
    g = torch.Generator().manual_seed(20_000 + seed)
    qperm, qpos = torch.randperm(xq.shape[0], generator=g), 0
    student.train()
    teacher.train()
    t0, quiz_losses = time.perf_counter(), []
    for batches in per_epoch:
        for idx in batches:
            if qpos + bs > xq.shape[0]:
                qperm, qpos = torch.randperm(xq.shape[0], generator=g), 0
            qi = qperm[qpos:qpos + bs]
            qpos += bs
            q = md.step(x[idx], y[idx], xq[qi], yq[qi])["quiz_loss"]
            if q == q:
                quiz_losses.append(q)
        sched.step()
    student.eval()
    teacher.eval()
    return {"time_s": time.perf_counter() - t0, "meta_steps": len(quiz_losses),
            "quiz_loss_last": mean_std(quiz_losses[-50:])[0] if quiz_losses else float("nan")}


def _tune(parts: dict, teacher: torch.nn.Module, t_logits_s: torch.Tensor, tr_idx, q_idx,
          make_student: Callable[[], torch.nn.Module], cfg: dict, dev: str) -> dict[str, Any]:
    """(T, a) of vanilla KD on val, then MetaDistil's teacher meta lr on val with that (T, a)."""
    kw = dict(epochs=cfg["student_epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], device=dev)

    def kd_val(temperature: float, alpha: float, s: int) -> float:
        torch.manual_seed(s)
        return train_model(make_student(), parts["student_train"], _kd_terms(alpha, temperature),
                           test=parts["val"], teacher=t_logits_s, seed=s, **kw)["test_acc"]

    grid = [{"T": t, "alpha": a, "val_acc": mean_std([kd_val(t, a, s) for s in TUNE_SEEDS])[0]}
            for t, a in itertools.product(GRID_T, GRID_ALPHA)]
    best = max(grid, key=lambda e: e["val_acc"])
    xs, ys = parts["student_train"]
    meta = []
    for lr in GRID_META_LR:
        accs = []
        for s in TUNE_SEEDS:
            torch.manual_seed(s)
            st = make_student()
            metadistil_student(st, copy.deepcopy(teacher), (xs[tr_idx], ys[tr_idx]), (xs[q_idx], ys[q_idx]),
                               cfg=cfg, seed=s, alpha=best["alpha"], temperature=best["T"], meta_lr=lr,
                               frozen_fraction=cfg["teacher_frozen_fraction"])
            accs.append(evaluate(st, parts["val"]))
        meta.append({"meta_lr": lr, "val_acc": mean_std(accs)[0]})
    best_meta = max(meta, key=lambda e: e["val_acc"])
    return {"T": best["T"], "alpha": best["alpha"], "meta_lr": best_meta["meta_lr"], "grid": grid, "meta": meta}


def _claims(rows: list[dict]) -> list[str]:
    """One line per claim, decided by the paired 95 % interval (seeds) on test accuracy."""
    claims = [
        ("MetaDistil gives a better student than vanilla KD with a fixed teacher", ARMS["md"], ARMS["kd"]),
        ("the meta updates themselves help (MetaDistil vs the same loop, data and batches with the "
         "teacher kept fixed)", ARMS["md"], ARMS["kd_heldout"]),
        ("MetaDistil gives a better student than training alone", ARMS["md"], ARMS["ce"]),
        ("vanilla KD improves on the student alone (the premise)", ARMS["kd"], ARMS["ce"]),
    ]
    return claim_notes(rows, claims, label=FASHION)


@register("metadistil", "MetaDistil (meta-learned teacher, released schedule) vs vanilla KD on Fashion-MNIST "
                        "(docs/papers.md section 5)",
          minutes=3, quick_minutes=0.3, seeds=(0, 1, 2, 3, 4), threads=1)
def run(args: ReproArgs) -> dict[str, Any]:
    dev, cfg = args.device, (QUICK if args.quick else FULL)
    parts = fashion_split(n_val=N_VAL, split_seed=SPLIT_SEED, quick_sizes=QUICK_SIZES if args.quick else None)
    xs, ys = parts["student_train"]
    xte, yte = parts["test"]
    tr_idx, q_idx = quiz_split(xs.shape[0], cfg["quiz_fraction"], seed=SPLIT_SEED)
    torch.manual_seed(TEACHER_SEED)
    teacher = mlp(784, list(cfg["teacher_hidden"]), 10)
    t_r = train_model(teacher, parts["teacher_train"], [CrossEntropyTerm()], test=parts["val"],
                      epochs=cfg["teacher_epochs"], lr=cfg["teacher_lr"], batch_size=128, seed=TEACHER_SEED,
                      device=dev)
    teacher_test = evaluate(teacher, parts["test"])
    t_logits_s = predict_logits(teacher, xs, device=dev).cpu()
    print(f"teacher val {t_r['test_acc']:.4f} test {teacher_test:.4f}", flush=True)

    def make_student() -> torch.nn.Module:
        return mlp(784, [cfg["student_hidden"]], 10)

    tune = _tune(parts, teacher, t_logits_s, tr_idx, q_idx, make_student, cfg, dev)
    T, a, meta_lr = tune["T"], tune["alpha"], tune["meta_lr"]
    print(f"tuned on val: T={T:g} a={a:g} meta_lr={meta_lr:g}", flush=True)
    kw = dict(epochs=cfg["student_epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], device=dev)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        init = make_student().state_dict()

        def fresh(init: dict = init) -> torch.nn.Module:
            m = make_student()
            m.load_state_dict(init)
            return m

        for arm, losses in (("ce", [CrossEntropyTerm()]), ("kd", _kd_terms(a, T))):
            r = train_model(fresh(), parts["student_train"], losses, test=(xte, yte), teacher=t_logits_s,
                            seed=seed, **kw)
            rows.append({"dataset": FASHION, "method": ARMS[arm], "seed": seed, "test_acc": r["test_acc"],
                         "time_s": r["time_s"]})
        for arm, frozen in (("kd_heldout", 1.0), ("md", cfg["teacher_frozen_fraction"])):
            st, tch = fresh(), copy.deepcopy(teacher)
            r = metadistil_student(st, tch, (xs[tr_idx], ys[tr_idx]), (xs[q_idx], ys[q_idx]), cfg=cfg,
                                   seed=seed, alpha=a, temperature=T, meta_lr=meta_lr, frozen_fraction=frozen)
            row = {"dataset": FASHION, "method": ARMS[arm], "seed": seed, "test_acc": evaluate(st, (xte, yte)),
                   "time_s": r["time_s"]}
            if arm == "md":
                row.update(teacher_acc_after=evaluate(tch, (xte, yte)), meta_steps=r["meta_steps"],
                           quiz_loss_last=r["quiz_loss_last"])
            rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{r['method']} {r['test_acc']:.4f}" for r in rows
                                           if r["seed"] == seed), flush=True)

    notes = _claims(rows)
    md_rows = [r for r in rows if r["method"] == ARMS["md"]]
    notes.append("teacher test accuracy after the meta updates (pre-trained: "
                 f"{teacher_test * 100:.2f} %): " + ", ".join(
                     f"seed {r['seed']}: {(r['teacher_acc_after'] - teacher_test) * 100:+.2f} points" for r in md_rows))
    if args.quick:
        notes.append("QUICK run (small data, few epochs): not for reporting")
    lines = []
    for base in (ARMS["kd"], ARMS["kd_heldout"]):
        spec = {"baseline": base, "metric": "test_acc", "within": ("dataset",)}
        lines += [paired_table(rows, spec), ""]
    lines.append(f"Reference: teacher test accuracy {teacher_test * 100:.2f} %, val {t_r['test_acc'] * 100:.2f} %")
    tuning = [
        f"T in {list(GRID_T)} x a in {list(GRID_ALPHA)} for vanilla KD on val ({int(parts['val'][1].numel())} "
        f"images, tuning seeds {list(TUNE_SEEDS)}, mean val accuracy): chose T = {T:g}, a = {a:g}, used by KD, "
        "KD quiz held out and MetaDistil; test never used for a choice",
        "val accuracy per grid point (%): " + ", ".join(
            f"T={e['T']:g} a={e['alpha']:g}: {e['val_acc'] * 100:.2f}" for e in tune["grid"]),
        f"MetaDistil teacher meta learning rate in {list(GRID_META_LR)} on val (same seeds, with the chosen T, a): "
        f"chose {meta_lr:g}; val accuracy (%): " + ", ".join(
            f"{e['meta_lr']:g}: {e['val_acc'] * 100:.2f}" for e in tune["meta"]),
    ]
    setup = {
        "teacher": f"MLP 784-{'-'.join(map(str, cfg['teacher_hidden']))}-10, seed {TEACHER_SEED}, SGD 0.9 "
                   f"lr {cfg['teacher_lr']} cosine {cfg['teacher_epochs']} epochs on teacher_train",
        "students": f"MLP 784-{cfg['student_hidden']}-10, SGD 0.9 lr {cfg['lr']} cosine per epoch, "
                    f"{cfg['student_epochs']} epochs, batch {cfg['batch_size']}, same init per seed across arms",
        "quiz split": f"{len(q_idx)} of the {xs.shape[0]} student_train images (seed {SPLIT_SEED}), "
                      f"MetaDistil and KD-quiz-held-out train on the other {len(tr_idx)}; CE and KD on all "
                      f"{xs.shape[0]}",
        "schedule": f"teacher frozen for the first {cfg['teacher_frozen_fraction']:.1%} of the student steps, then "
                    "one meta update per step; pilot step = plain SGD at the student's current lr",
        "teacher meta optimiser": f"Adam lr (tuned), meta-gradient norm clipped to {cfg['teacher_clip']}",
        "KD loss": "(1 - a) CE + a T^2 KL(teacher_T || student_T)",
        "threads": 1, "kd_loss backend": kd_backend(dev),
    }
    res = write_results(
        "metadistil", rows, args.out_dir,
        title="MetaDistil (Zhou, Xu & McAuley, ACL 2022; docs/papers.md §5): meta-learned teacher vs vanilla KD",
        group_by=("dataset", "method"), metrics=("test_acc", "teacher_acc_after"),
        labels={"test_acc": "student test acc (%)", "teacher_acc_after": "teacher test acc after (%)"},
        scale={"test_acc": 100.0, "teacher_acc_after": 100.0},
        data_note=fashion_note(parts, n_val=N_VAL, split_seed=SPLIT_SEED), notes=notes, setup=setup,
        extra_md="\n".join(lines), wall_s=time.perf_counter() - args.started, seeds=args.seeds,
        paired={"baseline": ARMS["ce"], "metric": "test_acc", "within": ("dataset",)},
        tuning=tuning, departures=DEPARTURES)
    res["table"] = res["table"] + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(notes)
    return res
