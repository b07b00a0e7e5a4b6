"""``kdengine repro crossbar_mnist``: a binary MNIST network on simulated crossbars: accuracy vs ADC
bits and vs stored-bit error rate.

What it does (``kdengine repro crossbar_mnist``, or :func:`run`):

1. Data: :func:`kdengine.data.load_mnist` (the 10,000 official MNIST test images split 8,000 train
   / 2,000 test by the fixed seeded permutation, seed 0).
2. Model: :func:`kdengine.models.binary_mlp`, binary weights *and* activations in its hidden
   layers (BinaryNet style, the ``mode="both"`` recipe of ``kdengine repro binary_mnist``):
   ``Flatten | Linear(784, H) BN | BinaryLinear(H, H) BN | BinaryLinear(H, H) BN | Linear(H, 10)``
   (H = 512; first and last layer full precision; each binary layer's sign of its BN-normalised
   input is the nonlinearity), trained with Adam + cosine decay and the clipped STE.
3. Packed (:func:`kdengine.nn.pack_model`), saved and run by the inference runtime
   (:func:`kdengine.infer.load`): test accuracy and batch-1 latency.
4. Crossbar simulation (:func:`kdengine.crossbar.simulate`) of the two binary layers
   (K = H = 512 rows: 4 row tiles of 128 or 2 of 256; 512 columns) on the 2,000 test images:

   * the ideal crossbar (``adc_bits=None``) is checked to reproduce the runtime's logits bit for
     bit;
   * accuracy vs ADC bits b = 1..8 (and ideal), for 128, 256 and 512 rows (512: one tile per
     column, i.e. the ADC sees the whole dot product), with two ADC windows: the
     tile's full range ``[-n, n]`` and a window of 3 RMS of the partial sums per layer
     (:func:`kdengine.crossbar.calibrate_adc_clip` on 1,000 *training* images);
   * accuracy vs stored-bit error rate (0, 1e-4, 1e-3, 1e-2, 4e-2, and 0.1, 0.2, 0.5 to show where
     it breaks; 5 seeds each: mean, min, max),
     with an ideal ADC and with the 3-bit calibrated ADC of 128 rows (the XNOR-RRAM setting of
     ANCHORS.md: 128 x 128 arrays, 3-bit sense amplifiers);
   * counts of tile activations and ADC conversions for the test pass;
   * for every setting, besides the accuracy, the fraction of test predictions identical to the
     ideal crossbar's (``agreement``): it shows the ADC and the flips at work even where the
     accuracy hardly moves.

Everything on the CPU; ``kdengine repro`` runs it with 2 torch threads. Writes
``crossbar_mnist.json``, ``.md`` and ``.png``. ``--quick``: hidden width 128, one epoch, one
bit-flip seed per error rate.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional

import torch

from kdengine.crossbar import calibrate_adc_clip, simulate
from kdengine.data import load_mnist
from kdengine.infer import load
from kdengine.models import binary_mlp
from kdengine.nn import pack_model
from kdengine.repro import ReproArgs, register
from kdengine.repro.common import RunClock, fit_adam_steps
from kdengine.repro.results import pyplot, save_figure, to_json, write_files
from kdengine.serialize import save_packed

__all__ = ["run"]

BERS = (0.0, 1e-4, 1e-3, 1e-2, 4e-2, 0.1, 0.2, 0.5)  # the last three: where it breaks
BITS = (1, 2, 3, 4, 5, 6, 7, 8)
ROWS = (128, 256, 512)  # 512 = one tile holds all K = 512 rows


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((logits.argmax(1) == y).float().mean()), 4)


def _agree(logits: torch.Tensor, ideal: torch.Tensor) -> float:
    """Fraction of predictions equal to the ideal crossbar's."""
    return round(float((logits.argmax(1) == ideal.argmax(1)).float().mean()), 4)


def run(seed: int = 0, epochs: int = 6, hidden: int = 512, seeds: int = 5,
        quiet: bool = False, save_model: Optional[str] = None) -> dict:
    """Train, pack, simulate; returns a JSON-ready dict (see the module docstring).
    ``save_model``: also keep the packed model file there (for ``kdengine infer``)."""
    log = (lambda *_: None) if quiet else print
    x_tr, y_tr = load_mnist("train", seed=seed)
    x_te, y_te = load_mnist("test", seed=seed)
    torch.manual_seed(seed)
    model = binary_mlp(hidden)
    log(f"[train] binary MLP 784-{hidden}-{hidden}-{hidden}-10, hidden layers binary (weights and activations)")
    phases: dict[str, float] = {}
    tp = time.perf_counter()
    train = fit_adam_steps(model, x_tr, y_tr, epochs=epochs, lr=5e-3, seed=seed, binary=True, log=log)
    phases["train"] = time.perf_counter() - tp
    tp = time.perf_counter()
    model.eval()
    with torch.no_grad():
        trained_acc = _acc(model(x_te), y_te)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "binary_mlp.safetensors")
        save_packed(pack_model(model), path)
        file_bytes = os.path.getsize(path)
        im = load(path)
        if save_model:
            shutil.copyfile(path, save_model)
    logits = im.predict(x_te)
    lat = im.latency(x_te[:1], repeat=200)
    runtime = {"test_accuracy": _acc(logits, y_te), "file_bytes": file_bytes,
               "latency_batch1_ms": {"p50": round(lat.p50_ms, 4), "p99": round(lat.p99_ms, 4)}}
    log(f"[runtime] accuracy {runtime['test_accuracy']} (trained model {trained_acc}), "
        f"batch-1 p50 {lat.p50_ms:.3f} ms p99 {lat.p99_ms:.3f} ms, file {file_bytes} bytes")

    ideal, st = simulate(im, x_te, rows=128)
    exact = torch.equal(ideal, logits)
    log(f"[crossbar] ideal ADC, no errors == packed kernels bit for bit: {exact}")
    counts = {}
    for rows in ROWS:
        _, s = simulate(im, x_te[:1], rows=rows)
        counts[str(rows)] = {
            "arrays": sum(layer.arrays for layer in s.layers),
            "tile_activations_per_image": s.tile_activations,
            "adc_conversions_per_image": s.adc_conversions,
            "tile_activations_test_set": s.tile_activations * len(x_te),
            "adc_conversions_test_set": s.adc_conversions * len(x_te),
            "layers": [{"name": layer.name, "k": layer.k, "n": layer.n, "row_tiles": layer.row_tiles}
                       for layer in s.layers],
        }
    phases["runtime_and_counts"] = time.perf_counter() - tp
    tp = time.perf_counter()
    calib = {str(rows): calibrate_adc_clip(im, x_tr[:1000], rows=rows, n_sigma=3.0) for rows in ROWS}
    psum = {str(rows): {layer.name: round(layer.psum_rms, 3)
                        for layer in simulate(im, x_tr[:1000], rows=rows)[1].layers} for rows in ROWS}

    adc: dict[str, Any] = {}
    for rows in ROWS:
        for window in ("full", "3rms"):
            key = f"rows{rows}_{window}"
            clip = None if window == "full" else calib[str(rows)]
            accs, sat, agree = {}, {}, {}
            for b in BITS:
                out, s = simulate(im, x_te, rows=rows, adc_bits=b, adc_clip=clip)
                accs[str(b)] = _acc(out, y_te)
                agree[str(b)] = _agree(out, ideal)
                sat[str(b)] = round(sum(layer.saturations for layer in s.layers) / s.adc_conversions, 5)
            accs["ideal"] = _acc(ideal, y_te)
            adc[key] = {"rows": rows, "window": window, "accuracy": accs, "agreement_with_ideal": agree,
                        "saturation_rate": sat}
            log(f"[adc] {key}: " + " ".join(f"{k}:{v}" for k, v in accs.items()))

    phases["adc_sweep"] = time.perf_counter() - tp
    tp = time.perf_counter()
    ber: dict[str, Any] = {}
    for label, bits, clip in (("ideal ADC", None, None), ("3-bit ADC, 3-RMS window", 3, calib["128"])):
        res = {}
        for q in BERS:
            vals, flips, agree = [], [], []
            for sd in range(seeds if q > 0 else 1):
                out, s = simulate(im, x_te, rows=128, adc_bits=bits, adc_clip=clip, bit_error_rate=q, seed=sd)
                vals.append(_acc(out, y_te))
                agree.append(_agree(out, ideal))
                flips.append(s.flipped_bits)
            res[str(q)] = {"mean": round(sum(vals) / len(vals), 4), "min": min(vals), "max": max(vals),
                           "seeds": len(vals), "mean_flipped_bits": sum(flips) / len(flips),
                           "agreement_with_ideal": round(sum(agree) / len(agree), 4)}
        ber[label] = res
        log(f"[ber] {label}: " + " ".join(f"{k}:{v['mean']}" for k, v in res.items()))
    phases["ber_sweep"] = time.perf_counter() - tp
    return {
        "experiment": "crossbar_mnist",
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
        "data": {"dataset": "MNIST official test set (t10k), kdengine.data.load_mnist",
                 "split": f"seeded permutation: {len(x_tr)} train / {len(x_te)} test", "seed": seed},
        "model": {"architecture": f"Flatten | Linear(784,{hidden}) BN | BinaryLinear({hidden},{hidden}, both) BN "
                                  f"| BinaryLinear({hidden},{hidden}, both) BN | Linear({hidden},10)",
                  "epochs": epochs, "optimizer": "Adam lr 5e-3, cosine decay, batch 128", **train,
                  "trained_test_accuracy": trained_acc},
        "runtime": runtime,
        "crossbar": {
            "ideal_equals_packed_kernels": exact,
            "adc_model": "per tile: window [-c, c], c = tile rows (full) or min(3 x RMS of the layer's "
                         "partial sums on 1,000 training images, tile rows); 2^b levels including both ends, "
                         "round half to even, clamp = saturation; tiles summed digitally",
            "adc_windows_3rms": calib,
            "partial_sum_rms": psum,
            "counts": counts,
            "accuracy_vs_adc_bits": adc,
            "accuracy_vs_bit_error_rate": ber,
        },
        "threads": torch.get_num_threads(),
    }


def _markdown(res: dict) -> str:
    cb, m, rt = res["crossbar"], res["model"], res["runtime"]
    mach = res.get("machine", {})
    lines = [
        "# Binary MNIST on simulated crossbars (kdengine repro crossbar_mnist)",
        "",
        f"- Machine: {mach.get('cpu', '?')}, {res['threads']} torch threads, torch {mach.get('torch', '?')}; "
        f"date {mach.get('date', '?')}; whole run {res.get('wall_seconds', '?')} s wall "
        f"({', '.join(f'{k} {v} s' for k, v in res.get('phase_seconds', {}).items())}; 1-min load average "
        f"{res.get('load_average_1min', {}).get('start', '?')} at start, on cores shared with other jobs)",
        f"- Data: {res['data']['dataset']}; {res['data']['split']}, seed {res['data']['seed']}",
        f"- Model: {m['architecture']}; {m['epochs']} epochs, {m['optimizer']}; trained in {m['train_seconds']} s",
        f"- Test accuracy: trained model {m['trained_test_accuracy']}, packed model in kdengine.infer "
        f"{rt['test_accuracy']} (batch-1 latency p50 {rt['latency_batch1_ms']['p50']} ms, "
        f"p99 {rt['latency_batch1_ms']['p99']} ms; file {rt['file_bytes']} bytes)",
        f"- Ideal crossbar (unlimited ADC bits, no bit errors) == packed kernels bit for bit: "
        f"**{cb['ideal_equals_packed_kernels']}**",
        f"- ADC model: {cb['adc_model']}",
        "",
        "## Accuracy vs ADC bits (2,000 test images)",
        "",
        "| rows, window | " + " | ".join(f"b={b}" for b in BITS) + " | ideal |",
        "|---|" + "---|" * (len(BITS) + 1),
    ]
    for _key, v in cb["accuracy_vs_adc_bits"].items():
        a = v["accuracy"]
        lines.append(f"| {v['rows']}, {v['window']} | " + " | ".join(f"{a[str(b)]:.4f}" for b in BITS)
                     + f" | {a['ideal']:.4f} |")
    lines += ["", "Agreement with the ideal crossbar's predictions:", "",
              "| rows, window | " + " | ".join(f"b={b}" for b in BITS) + " |", "|---|" + "---|" * len(BITS)]
    for _key, v in cb["accuracy_vs_adc_bits"].items():
        g = v["agreement_with_ideal"]
        lines.append(f"| {v['rows']}, {v['window']} | " + " | ".join(f"{g[str(b)]:.4f}" for b in BITS) + " |")
    lines += ["", "Saturation rate (fraction of conversions clipped), 3-RMS windows: " + "; ".join(
        f"{k}: " + ", ".join(f"b{b} {v['saturation_rate'][str(b)]}" for b in (1, 3, 8))
        for k, v in cb["accuracy_vs_adc_bits"].items() if v["window"] == "3rms"),
        "",
        "3-RMS windows per layer (partial-sum units): " + json.dumps(
            {r: {k: round(c, 1) for k, c in d.items()} for r, d in cb["adc_windows_3rms"].items()}),
        "",
        "## Accuracy vs stored-bit error rate (128 rows; mean [min, max] over seeds)",
        "",
        "| ADC | " + " | ".join(f"BER {q:g}" for q in BERS) + " |",
        "|---|" + "---|" * len(BERS),
    ]
    for label, res_q in cb["accuracy_vs_bit_error_rate"].items():
        cells = (f"{res_q[str(q)]['mean']:.4f} [{res_q[str(q)]['min']:.4f}, {res_q[str(q)]['max']:.4f}]"
                 for q in BERS)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Agreement with the ideal crossbar's predictions (mean over seeds): " + "; ".join(
        f"{label}: " + ", ".join(f"{q:g}: {r[str(q)]['agreement_with_ideal']}" for q in BERS)
        for label, r in cb["accuracy_vs_bit_error_rate"].items())]
    lines += ["", "## Counts (the two binary layers)", "",
              "| rows | arrays | tile activations / image | ADC conversions / image | ADC conversions, test set |",
              "|---|---|---|---|---|"]
    for rows, c in cb["counts"].items():
        lines.append(f"| {rows} | {c['arrays']} | {c['tile_activations_per_image']} | "
                     f"{c['adc_conversions_per_image']} | {c['adc_conversions_test_set']} |")
    lines.append("")
    return "\n".join(lines)


def _figure(res: dict) -> Any:
    """The three panels (accuracy and agreement vs ADC bits, accuracy vs bit-error rate), or None
    without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    cb = res["crossbar"]
    fig, (a1, a0, a2) = plt.subplots(1, 3, figsize=(15, 4.4))
    accs = []
    for _key, v in cb["accuracy_vs_adc_bits"].items():
        style = dict(marker="o", ls="-" if v["window"] == "3rms" else "--",
                     label=f"{v['rows']} rows, {v['window']} window")
        a1.plot(BITS, [v["accuracy"][str(b)] for b in BITS], **style)
        a0.plot(BITS, [v["agreement_with_ideal"][str(b)] for b in BITS], **style)
        accs += [v["accuracy"][str(b)] for b in BITS]
    ideal_acc = cb["accuracy_vs_adc_bits"]["rows128_full"]["accuracy"]["ideal"]
    a1.axhline(ideal_acc, color="k", lw=0.8, ls=":", label="ideal ADC")
    a1.set_xlabel("ADC bits per tile")
    a1.set_ylabel("test accuracy (2,000 images)")
    a1.set_title("accuracy vs ADC resolution (zoomed y axis)")
    a1.set_ylim(min(accs + [ideal_acc]) - 0.01, max(accs + [ideal_acc]) + 0.005)
    a1.legend(fontsize=7)
    a0.set_xlabel("ADC bits per tile")
    a0.set_ylabel("predictions equal to the ideal crossbar's")
    a0.set_title("agreement with the ideal ADC")
    xs = [q if q > 0 else 1e-5 for q in BERS]
    for label, res_q in cb["accuracy_vs_bit_error_rate"].items():
        mean = [res_q[str(q)]["mean"] for q in BERS]
        lo = [res_q[str(q)]["mean"] - res_q[str(q)]["min"] for q in BERS]
        hi = [res_q[str(q)]["max"] - res_q[str(q)]["mean"] for q in BERS]
        a2.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, label=f"128 rows, {label}")
    a2.set_xscale("log")
    a2.set_xticks(xs)
    a2.set_xticklabels(["0"] + [f"{q:g}" for q in BERS[1:]])
    a2.set_xlabel("stored-bit error rate")
    a2.set_title("accuracy vs stored-bit flips (seeds: mean, min-max)", fontsize=10)
    a2.set_ylim(0, 1)
    a2.legend(fontsize=8)
    fig.suptitle("Binary MLP (2 hidden 512x512 layers with binary weights and activations) on simulated "
                 "XNOR crossbars, MNIST")
    fig.tight_layout()
    return fig


QUICK = dict(epochs=1, hidden=128, seeds=1)


@register("crossbar_mnist", "binary MLP on simulated XNOR crossbars: accuracy vs ADC bits and stored-bit "
                            "error rate", minutes=2, quick_minutes=0.1,
          seeds=(0,), record_subdir="", threads=2)
def entry(args: ReproArgs) -> dict:
    clock = RunClock()
    res = clock.stamp(run(seed=args.seeds[0], **(QUICK if args.quick else {})))
    md = _markdown(res)
    files: dict[str, Any] = {"crossbar_mnist.json": to_json(res, indent=2), "crossbar_mnist.md": md}
    fig = _figure(res)
    if fig is not None:
        files["crossbar_mnist.png"] = save_figure(fig)
    return {"table": md, "paths": write_files(args.out_dir, files)}
