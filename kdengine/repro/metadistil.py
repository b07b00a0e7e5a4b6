"""``kdengine repro metadistil``: MetaDistil (meta-learned teacher, docs/papers.md s5) on MNIST.

Per seed: an MLP teacher is trained once on the 8,000 training images. The training set is split
9:1 (seeded, :func:`~kdengine.methods.metadistil.quiz_split`) into 7,200 train and 800 quiz
images. Students of one small MLP architecture start from the same initialisation:

* ``alone``: CE on all 8,000 images
* ``kd``: 0.5 CE + 0.5 T^2 KL (T = 4) on all 8,000 images, the pretrained teacher frozen
* ``metadistil``: :class:`~kdengine.methods.metadistil.MetaDistil` on the 7,200 (the same KD
  loss for the student), the teacher (a copy of the pretrained one) updated every step by the
  second-order meta-gradient of the quiz loss on a batch of the 800 quiz images

All arms see the same 8,000 labelled images: the baselines use the quiz part as training data,
MetaDistil uses it (only) to teach the teacher. Reported: student test accuracy and, for
MetaDistil, the teacher's test accuracy after the meta updates.
"""
from __future__ import annotations

import copy
import time
from typing import Any

import torch

from kdengine.methods.metadistil import MetaDistil, quiz_split
from kdengine.repro import ReproArgs, register
from kdengine.models import mlp
from kdengine.repro.common import compare_to, fit_recipe, mnist_setup, summarize, write_mnist_results
from kdengine.train import CrossEntropyTerm, KDTerm, evaluate, predict_logits
from kdengine.train.distiller import global_batches

FULL = dict(teacher_hidden=(256, 256), student_hidden=(32,), teacher_epochs=8, teacher_lr=2e-3,
            student_epochs=10, lr=2e-3, optimizer="adam", batch_size=128, temperature=4.0,
            alpha=0.5, pilot_lr=0.1, meta_teacher_lr=1e-4, teacher_clip=1.0, quiz_fraction=0.1,
            split_seed=0)
QUICK = dict(FULL, teacher_epochs=2, student_epochs=2)


def _metadistil_arm(student, teacher, train, quiz, test, cfg, seed) -> dict[str, Any]:
    s_opt = torch.optim.Adam(student.parameters(), lr=cfg["lr"])
    t_opt = torch.optim.Adam(teacher.parameters(), lr=cfg["meta_teacher_lr"])
    epochs = cfg["student_epochs"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(s_opt, T_max=epochs)
    md = MetaDistil(student, teacher, s_opt, t_opt, alpha=cfg["alpha"],
                    temperature=cfg["temperature"], pilot_lr=cfg["pilot_lr"],
                    teacher_clip=cfg["teacher_clip"])
    (x, y), (xq, yq) = train, quiz
    g = torch.Generator().manual_seed(10_000 + seed)
    qperm, qpos = torch.randperm(xq.shape[0], generator=g), 0
    student.train()
    teacher.train()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    quiz_losses = []
    for ep in range(epochs):
        for idx in global_batches(x.shape[0], cfg["batch_size"], seed, ep):
            if qpos + cfg["batch_size"] > xq.shape[0]:   # next pass over the quiz set
                qperm, qpos = torch.randperm(xq.shape[0], generator=g), 0
            qi = qperm[qpos:qpos + cfg["batch_size"]]
            qpos += cfg["batch_size"]
            out = md.step(x[idx], y[idx], xq[qi], yq[qi])
            quiz_losses.append(out["quiz_loss"])
        sched.step()
    return {"test_acc": evaluate(student, test), "teacher_acc_after": evaluate(teacher, test),
            "quiz_loss_last_epoch": sum(quiz_losses[-len(quiz_losses) // epochs:]) /
            max(len(quiz_losses) // epochs, 1), "time_s": time.perf_counter() - t0}


@register("metadistil", "MetaDistil (meta-learned teacher) vs vanilla KD on MNIST (docs/papers.md section 5)",
          minutes=1.2, quick_minutes=0.5)
def run(args: ReproArgs) -> dict:
    cfg, train, test = mnist_setup(args, FULL, QUICK)
    xtr, ytr = train
    tr_idx, q_idx = quiz_split(xtr.shape[0], cfg["quiz_fraction"], seed=cfg["split_seed"])
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        teacher = mlp(784, cfg["teacher_hidden"], 10)
        fit_recipe(teacher, train, [CrossEntropyTerm()], cfg, seed, epochs_key="teacher_epochs",
                   lr_key="teacher_lr")
        teacher.eval()
        t_acc = evaluate(teacher, test)
        rows.append({"dataset": "MNIST", "method": "teacher", "seed": seed, "test_acc": t_acc})
        t_logits = predict_logits(teacher, xtr)
        print(f"seed {seed} teacher test_acc={t_acc:.4f}", flush=True)
        torch.manual_seed(1000 + seed)
        init = mlp(784, cfg["student_hidden"], 10).state_dict()

        def fresh(init=init):
            m = mlp(784, cfg["student_hidden"], 10)
            m.load_state_dict(init)
            return m

        ce, kd = CrossEntropyTerm(), KDTerm(cfg["temperature"])
        for name, losses, tl in (("alone", [ce], None),
                                 ("kd", [(1 - cfg["alpha"], ce), (cfg["alpha"], kd)], t_logits)):
            res = fit_recipe(fresh(), train, losses, cfg, seed, test=test, teacher=tl)
            rows.append({"dataset": "MNIST", "method": name, "seed": seed, **res})
            print(f"seed {seed} {name:<10} test_acc={res['test_acc']:.4f} ({res['time_s']:.1f} s)",
                  flush=True)
        res = _metadistil_arm(fresh(), copy.deepcopy(teacher), (xtr[tr_idx], ytr[tr_idx]),
                              (xtr[q_idx], ytr[q_idx]), test, cfg, seed)
        rows.append({"dataset": "MNIST", "method": "metadistil", "seed": seed, **res})
        print(f"seed {seed} metadistil test_acc={res['test_acc']:.4f} teacher after="
              f"{res['teacher_acc_after']:.4f} ({res['time_s']:.1f} s)", flush=True)

    summ = summarize([r for r in rows if r["method"] != "teacher"], ["dataset", "method"], ["test_acc"])
    notes = [n for n in compare_to(summ, baseline="kd") if "] alone " not in n]
    notes += compare_to(summ, baseline="alone")
    md_rows = [r for r in rows if r["method"] == "metadistil"]
    t_rows = {r["seed"]: r["test_acc"] for r in rows if r["method"] == "teacher"}
    dt = [r["teacher_acc_after"] - t_rows[r["seed"]] for r in md_rows]
    notes.append("teacher test accuracy change under the meta updates: "
                 + ", ".join(f"seed {r['seed']}: {d * 100:+.2f} points" for r, d in zip(md_rows, dt)))
    setup = dict(cfg)
    setup.update(split=f"{len(tr_idx)} train / {len(q_idx)} quiz (seeded 9:1 split of the training set)",
                 pilot="plain SGD step of size pilot_lr (the real student step is Adam)",
                 teacher_optimizer="Adam(meta_teacher_lr), meta-gradient norm clipped to teacher_clip",
                 student_init="identical across the arms of a seed")
    return write_mnist_results(
        "metadistil", rows, args, cfg, title="MetaDistil (meta-learned teacher) on MNIST",
        metrics=("test_acc", "teacher_acc_after"),
        labels={"test_acc": "student test acc (%)", "teacher_acc_after": "teacher acc after (%)"},
        scale={"test_acc": 100.0, "teacher_acc_after": 100.0}, notes=notes, setup=setup)
