"""The demo pipeline: setup -> teacher -> distill -> runtime -> snn -> crossbar -> report.

See :mod:`kdengine.demo` for what each stage does; this module only wires the stages together,
times them and assembles the result dict that :mod:`kdengine.demo.report` turns into the table,
``demo.json``, ``demo.md`` and ``demo.png``.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

from kdengine import models
from kdengine.data import load_mnist
from kdengine.demo.config import N_TRAIN_PART, DemoConfig, make_config
from kdengine.demo.inmemory import crossbar_bar_total, run_crossbar_stage
from kdengine.demo.progress import Stages
from kdengine.demo.runtime import eager_fn, fp32_bytes, measure_latency, pack_and_load
from kdengine.demo.spiking import run_snn_stage, snn_bar_total
from kdengine.repro.results import write_file, write_files
from kdengine.train import CrossEntropyTerm, KDTerm, fit, predict_logits

__all__ = ["run", "STAGES", "DEFAULT_OUT"]

STAGES = ["setup", "teacher", "distill", "runtime", "snn", "crossbar", "report"]
DEFAULT_OUT = "kdengine-demo"


def steps_for(n: int, batch: int, epochs: int) -> int:
    """Optimizer steps of a run (for the progress bar's total)."""
    return epochs * math.ceil(n / batch)


def _train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch: int, seed: int,
           bar: Any, teacher_logits: Optional[Tensor] = None, temperature: float = 4.0,
           kd_weight: float = 0.5, binary: bool = False) -> dict:
    """One demo training run (:func:`kdengine.train.fit`: Adam, cosine decay per step to 0, binary
    latent weights clipped after every step); with ``teacher_logits`` ``(N, C)`` aligned with ``x``
    the loss is ``kd_weight * kd_loss(T) + (1 - kd_weight) * CE``, else CE alone. Returns a
    JSON-ready summary."""
    if teacher_logits is None:
        losses: Any = [CrossEntropyTerm()]
        loss_desc = "cross-entropy"
    else:
        losses = {"ce": (1.0 - kd_weight, CrossEntropyTerm()), "kd": (kd_weight, KDTerm(temperature))}
        loss_desc = f"{kd_weight:g} * kd_loss(T={temperature:g}) + {1 - kd_weight:g} * CE"
    r = fit(model, (x, y), losses, teacher=teacher_logits, epochs=epochs, lr=lr, optimizer="adam",
            schedule="step", batch_size=batch, seed=seed, binary=binary, on_step=lambda: bar.update(1))
    return {
        "loss": loss_desc, "epochs": epochs, "steps": r["steps"], "lr": lr, "batch": batch,
        "optimizer": "Adam, cosine decay per step to 0",
        "last_epoch": {k: round(float(v), 4) for k, v in r["last_epoch"].items()},
        "seconds": round(r["time_s"], 2), "cpu_seconds": round(r["cpu_s"], 2),
    }


def _acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return round(float((pred == y).double().mean()), 4)


def _backends() -> dict:
    """Which backend each op the demo uses resolves to on the CPU (informational)."""
    from kdengine import _dispatch

    out = {}
    for op in ("kd_loss", "binary_linear", "binary_conv2d", "spike_matmul", "if_multistep"):
        try:
            out[op] = _dispatch.resolve(op, torch.device("cpu"), None)
        except Exception as exc:  # noqa: BLE001 - an op this build does not have
            out[op] = f"unavailable: {type(exc).__name__}"
    return out


def _versions() -> dict:
    """Versions of kdengine and the libraries the demo leans on (torch/triton/python are in
    ``machine``)."""
    import importlib.metadata as md

    import kdengine

    out = {"kdengine": kdengine.__version__}
    for pkg in ("numpy", "matplotlib", "tqdm", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _setup(cfg: DemoConfig) -> dict:
    """Load the native library (a first use compiles it: timed here, not in a later stage)."""
    from kdengine import _native

    try:
        _native.load("cpu")
        native = "loaded"
    except Exception as exc:  # noqa: BLE001 - the reference backend still runs everything
        native = f"not available ({type(exc).__name__}); reference backends used"
    return {"native_cpu_library": native, "backends": _backends()}


def run(quick: bool = False, *, out: Optional[str] = DEFAULT_OUT, progress: bool = True,
        **overrides: Any) -> dict:
    """Run the whole demo; returns the result dict (also written under ``out``).

    Args:
        quick: the CI-sized preset (see :func:`kdengine.demo.config.make_config`).
        out: folder for ``demo.json``, ``demo.md``, ``demo.png`` and the packed student
            (``demo_xnor_student.safetensors``); created if missing. ``None``: write only the
            packed model, into a temporary folder, and no report files.
        progress: tqdm bars (one line per stage) on stderr.
        overrides: any :class:`~kdengine.demo.config.DemoConfig` field (``seed``, ``threads``,
            ``n_fit``, ``teacher_epochs``...), validated.
    """
    cfg = make_config(quick, **overrides)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder path (str) or None, got {type(out).__name__}")
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out must be a folder, but {os.fspath(out)!r} exists and is not a folder")
    from kdengine.bench.machine import machine_info

    t_all, c_all = time.perf_counter(), time.process_time()
    load0 = os.getloadavg()[0]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    stages = Stages(STAGES, enabled=progress)
    tmp = tempfile.TemporaryDirectory() if out is None else None
    out_dir = tmp.name if tmp is not None else os.fspath(out)
    os.makedirs(out_dir, exist_ok=True)
    res: dict[str, Any] = {"demo": "kdengine demo", "config": cfg.to_dict()}
    try:
        with stages.stage("setup", total=2) as bar:
            res["setup"] = _setup(cfg)
            bar.update(1)
            x8k, y8k = load_mnist("train", seed=cfg.split_seed)
            x_te, y_te = load_mnist("test", seed=cfg.split_seed)
            x_fit, y_fit = x8k[:cfg.n_fit], y8k[:cfg.n_fit]
            x_val, y_val = x8k[N_TRAIN_PART - cfg.n_heldout:], y8k[N_TRAIN_PART - cfg.n_heldout:]
            x_cal = x_fit[:cfg.n_calib]
            x_te, y_te = x_te[:cfg.n_test], y_te[:cfg.n_test]
            x_sn, y_sn = x_te[:cfg.n_test_snn], y_te[:cfg.n_test_snn]
            bar.update(1)
        res["data"] = {
            "dataset": "MNIST official test set (t10k, 10,000 images; LeCun, Cortes, Burges; CC BY-SA 3.0), "
                       "bundled with kdengine",
            "split": (f"kdengine.data.load_mnist seeded permutation 8000 train / 2000 test (split seed "
                      f"{cfg.split_seed}; run seed {cfg.seed}); "
                      f"of the 8000: the first {cfg.n_fit} train every network (the first {cfg.n_calib} of them "
                      f"also calibrate the SNN conversion and the ADC windows), the last {cfg.n_heldout} are the "
                      "held-out split for the SNN latency cuts; test images are only used for reporting"),
            "n_fit": len(x_fit), "n_heldout": len(x_val), "n_calibration": len(x_cal),
            "n_test": len(x_te), "n_test_snn": len(x_sn),
        }

        # ---- 1. teacher
        teacher = models.teacher_net(cfg.teacher_width, cfg.teacher_hidden, cfg.seed)
        with stages.stage("teacher", total=steps_for(len(x_fit), cfg.batch, cfg.teacher_epochs)) as bar:
            tr = _train(teacher, x_fit, y_fit, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr, batch=cfg.batch,
                     seed=cfg.seed, bar=bar)
            # the frozen teacher's logits, computed once and shared by every student
            cache = predict_logits(teacher, x_fit, batch_size=1000)
            t_acc = _acc(teacher, x_te, y_te)
            bar.set_postfix_str(f"test acc {t_acc:.4f}")
        res["teacher"] = {"architecture": f"vgg_relu(width={cfg.teacher_width}, hidden={cfg.teacher_hidden})",
                          "train": tr, "test_accuracy": t_acc, "state_bytes": fp32_bytes(teacher)}

        # ---- 2. students (fused KD loss on the cached teacher logits; CE-only contrast)
        n_runs = [cfg.student_epochs] * (2 if cfg.ce_baseline else 1) + [cfg.snn_student_epochs]
        with stages.stage("distill", total=sum(steps_for(len(x_fit), cfg.batch, e) for e in n_runs)) as bar:
            kd = dict(teacher_logits=cache, temperature=cfg.temperature, kd_weight=cfg.kd_weight)
            student = models.xnor_student(cfg.student_width, cfg.student_hidden, cfg.seed + 1)
            s_tr = _train(student, x_fit, y_fit, epochs=cfg.student_epochs, lr=cfg.student_lr, batch=cfg.batch,
                       seed=cfg.seed + 1, bar=bar, binary=True, **kd)
            s_acc = _acc(student, x_te, y_te)
            res["student"] = {"architecture": f"vgg_bn_sign(width={cfg.student_width}, hidden={cfg.student_hidden}) "
                                              "binarized mode='both' (first conv, last fc full precision)",
                              "train": s_tr, "test_accuracy": s_acc, "state_bytes": fp32_bytes(student)}
            post = [f"KD student {s_acc:.4f}"]
            bar.set_postfix_str(post[0])
            if cfg.ce_baseline:
                ce = models.xnor_student(cfg.student_width, cfg.student_hidden, cfg.seed + 1)
                c_tr = _train(ce, x_fit, y_fit, epochs=cfg.student_epochs, lr=cfg.student_lr, batch=cfg.batch,
                           seed=cfg.seed + 1, bar=bar, binary=True)
                res["student_ce"] = {"train": c_tr, "test_accuracy": _acc(ce, x_te, y_te),
                                     "state_bytes": fp32_bytes(ce)}
                post.append(f"CE only {res['student_ce']['test_accuracy']:.4f}")
                bar.set_postfix_str(", ".join(post))
                del ce
            snn_ann = models.snn_student(cfg.student_width, cfg.student_hidden, cfg.seed + 2)
            a_tr = _train(snn_ann, x_fit, y_fit, epochs=cfg.snn_student_epochs, lr=cfg.snn_student_lr,
                       batch=cfg.batch, seed=cfg.seed + 2, bar=bar, binary=True, **kd)
            res["snn_student"] = {"architecture": f"snn_cnn(width={cfg.student_width}, hidden={cfg.student_hidden}) "
                                                  "binarized mode='weights' (first conv, last fc full precision)",
                                  "train": a_tr, "test_accuracy": _acc(snn_ann, x_te, y_te),
                                  "state_bytes": fp32_bytes(snn_ann)}
            post.append(f"SNN's ANN {res['snn_student']['test_accuracy']:.4f}")
            bar.set_postfix_str(", ".join(post))
        if not cfg.ce_baseline:
            res["student_ce"] = None

        # ---- 3. pack, save, load with kdengine.infer, batch-1 latency
        with stages.stage("runtime", total=3) as bar:
            im, packed_logits, packed = pack_and_load(student, x_te, y_te, out_dir)
            bar.update(1)
            x1 = x_te[:1].contiguous()
            s_float = models.xnor_student_float(cfg.student_width, cfg.student_hidden, cfg.seed + 1)
            im.predict(x1)  # builds the batch-1 plan outside the timed calls
            bar.update(1)
            lat = measure_latency({
                "teacher_eager": eager_fn(teacher, x1),
                "student_float_eager": eager_fn(s_float, x1),
                "student_binary_eager": eager_fn(student, x1),
                "packed_runtime": lambda: im.predict(x1),
                "snn_student_binary_eager": eager_fn(snn_ann, x1),
            }, rounds=cfg.latency_rounds, per_round=cfg.latency_per_round)
            bar.update(1)
            bar.set_postfix_str(f"packed p50 {lat['packed_runtime']['p50_ms']:.3f} ms, fp32 eager "
                                f"{lat['student_float_eager']['p50_ms']:.3f} ms")
        packed["latency_batch1_ms"] = lat
        res["runtime"] = packed

        # ---- 4. binary SNN with the latency cuts
        with stages.stage("snn", total=snn_bar_total(cfg, snn_ann)) as bar:
            res["snn"] = run_snn_stage(snn_ann, x_cal, x_val, y_val, x_sn, y_sn, cfg, bar)
            bar.set_postfix_str(f"acc {res['snn']['test_accuracy']:.4f}, {res['snn']['mean_steps']:.2f} steps")

        # ---- 5. crossbar simulation of the XNOR layers
        with stages.stage("crossbar", total=crossbar_bar_total(cfg)) as bar:
            res["crossbar"] = run_crossbar_stage(im, packed_logits, x_cal, x_te, y_te, cfg, bar)
            bar.set_postfix_str(f"ideal == packed: {res['crossbar']['ideal_equals_packed_kernels']}, "
                                f"{cfg.xbar_adc_bits}-bit + BER {cfg.xbar_ber:g}: "
                                f"{res['crossbar']['setting_accuracy_mean']:.4f}")

        # ---- 6. table, plot, files
        from kdengine.demo import report

        with stages.stage("report", total=1) as bar:
            res["machine"] = machine_info()
            res["versions"] = _versions()
            res["load_average_1min"] = {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)}
            res["table"] = report.table_rows(res)
            if out is not None:
                png = os.path.join(out_dir, "demo.png")
                why = write_file(png, lambda tmp: report.write_plot(res, tmp))
                res["files"] = [os.path.basename(p) for p in ("demo.json", "demo.md")] + (
                    ["demo.png"] if why is None else []) + [res["runtime"]["file"]]
                if why is not None:
                    res["plot"] = why
            bar.update(1)
        res["stage_seconds"] = dict(stages.seconds)
        res["stage_cpu_seconds"] = dict(stages.cpu)
        res["wall_seconds"] = round(time.perf_counter() - t_all, 1)
        res["cpu_seconds"] = round(time.process_time() - c_all, 1)
        if out is not None:
            write_files(out_dir, {"demo.json": json.dumps(res, indent=1), "demo.md": report.markdown(res)})
        return res
    finally:
        torch.set_num_threads(old_threads)
        if tmp is not None:
            tmp.cleanup()
