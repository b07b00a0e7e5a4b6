"""The demo's report: the one table (printed), ``demo.json``, ``demo.md`` and ``demo.png``."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

__all__ = ["table_rows", "format_table", "markdown", "write_plot", "write_text", "COLUMNS"]

COLUMNS = ("model", "accuracy", "test images", "batch-1 p50 ms", "batch-1 p99 ms", "size bytes", "time steps")


def _lat(d: Optional[dict]) -> tuple[Optional[float], Optional[float]]:
    if not d:
        return None, None
    return d.get("p50_ms"), d.get("p99_ms")


def table_rows(res: dict) -> list[dict]:
    """The rows of the demo's table (one dict per row, keys :data:`COLUMNS` plus ``key`` and
    ``note``); every number comes from ``res`` (the run)."""
    lat = res["runtime"]["latency_batch1_ms"]
    n_test = res["data"]["n_test"]
    rows: list[dict] = []

    def add(key, model, acc, n, latency, size, steps=None, note=""):
        p50, p99 = _lat(latency)
        rows.append({"key": key, "model": model, "accuracy": acc, "test images": n, "batch-1 p50 ms": p50,
                     "batch-1 p99 ms": p99, "size bytes": size, "time steps": steps, "note": note})

    t = res["teacher"]
    add("teacher", "teacher (float CNN, torch eager)", t["test_accuracy"], n_test, lat["teacher_eager"],
        t["state_bytes"], note="fp32 state")
    s = res["student"]
    add("student", "student (binary W+A, KD; torch eager)", s["test_accuracy"], n_test, lat["student_binary_eager"],
        s["state_bytes"], note="fp32 latent weights as trained")
    if res.get("student_ce"):
        c = res["student_ce"]
        add("student_ce", "student (binary W+A, CE only, no KD)", c["test_accuracy"], n_test, None,
            c["state_bytes"], note="same architecture, init and data order as the KD student")
    p = res["runtime"]
    add("packed", "packed binary (kdengine.infer runtime)", p["test_accuracy"], n_test, lat["packed_runtime"],
        p["file_bytes"], note=f"safetensors file; {p['weight_bits_bytes']} bytes of sign bits")
    x = res["crossbar"]
    add("crossbar_ideal", f"crossbar, ideal ADC ({x['rows']} rows/tile)", x["ideal_accuracy"], x["n_test"], None,
        p["file_bytes"], note=f"== packed kernels bit for bit: {x['ideal_equals_packed_kernels']}; "
        f"{x['arrays']} arrays, {x['tile_activations_per_image']} tile activations and "
        f"{x['adc_conversions_per_image']} ADC conversions per image")
    st = x["setting"]
    add("crossbar", f"crossbar, {st['rows']} rows, {st['adc_bits']}-bit ADC, BER {st['bit_error_rate']:g}",
        x["setting_accuracy_mean"], x["n_test"], None, p["file_bytes"],
        note=f"mean of {st['seeds']} flip seed(s) [{x['setting_accuracy_min']}, {x['setting_accuracy_max']}]; "
        f"same ADC without flips {x['adc_only_accuracy']}")
    a = res["snn_student"]
    add("snn_ann", "SNN's ANN (binary W, ReLU, KD; torch eager)", a["test_accuracy"], n_test,
        lat["snn_student_binary_eager"], a["state_bytes"], note="fp32 latent weights as trained")
    n = res["snn"]
    ee = n["early_exit"]
    steps = n["mean_steps"]
    note = (f"early exit '{ee['rule']}' (cap T={ee['cap']}), tuned on held-out" if ee.get("rule")
            else f"no early-exit rule qualified: fixed T={ee['cap']}")
    note += f"; its ANN on the same {n['n_test']} images: {n['ann_test_accuracy']:.4f}"
    add("snn", "binary SNN (scaling search + early exit)", n["test_accuracy"], n["n_test"],
        n["latency_batch1_ms"], n["state_bytes"], steps=steps, note=note)
    return rows


def _fmt(v: Any, col: str) -> str:
    if v is None:
        return "-"
    if col == "accuracy":
        return f"{v:.4f}"
    if col in ("batch-1 p50 ms", "batch-1 p99 ms"):
        return f"{v:.3f}"
    if col == "time steps":
        return f"{v:.2f}"
    return str(v)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The table as aligned text (or a markdown table)."""
    cells = [[_fmt(r[c], c) for c in COLUMNS] for r in rows]
    if markdown:
        out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(COLUMNS)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(COLUMNS, widths)))
    out = [line, "-" * len(line)]
    for c in cells:
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(out)


def summary_lines(res: dict) -> list[str]:
    """The lines under the table: latency ratios, SNN and crossbar details, timings."""
    lat = res["runtime"]["latency_batch1_ms"]
    pk = lat["packed_runtime"]["p50_ms"]
    f = lat["student_float_eager"]["p50_ms"]
    t = lat["teacher_eager"]["p50_ms"]
    n, x, p = res["snn"], res["crossbar"], res["runtime"]
    ee = n["early_exit"]
    lines = [
        f"packed runtime batch-1 p50 {pk:.3f} ms vs the same architecture with fp32 layers in torch eager "
        f"{f:.3f} ms ({f / pk:.2f}x) and the teacher in torch eager {t:.3f} ms ({t / pk:.2f}x); "
        f"packed vs trained student: {p['prediction_mismatches_vs_trained']} differing predictions.",
        f"size: teacher {res['teacher']['state_bytes']} B fp32 -> packed student file {p['file_bytes']} B "
        f"({res['teacher']['state_bytes'] / p['file_bytes']:.1f}x smaller).",
        f"SNN: ANN {n['ann_test_accuracy']:.4f}; fixed T={n['fixed_T']}: {n['fixed_T_accuracy']:.4f} with the "
        f"searched scaling {n['search']['config']}, {n['fixed_T_accuracy_baseline']:.4f} without cuts (p99.9)"
        + (f"; early exit: {ee['mean_steps_used']} steps on average ({ee['step_cut_vs_cap']}x fewer than the cap), "
           f"p50/p90/max {ee['steps_p50_p90_max']}" if ee.get("rule") else "") + ".",
        f"crossbar: ideal ADC == packed kernels bit for bit: {x['ideal_equals_packed_kernels']} (asserted); "
        f"{x['tile_activations_test_pass']} tile activations and {x['adc_conversions_test_pass']} ADC conversions "
        f"for the {x['n_test']} test images; accuracy vs ADC bits (first {x['sweep_n_test']} test images) "
        f"{x['accuracy_vs_adc_bits']}.",
    ]
    if res.get("student_ce"):
        lines.append(f"KD vs CE only (same student, init, data order): {res['student']['test_accuracy']:.4f} vs "
                     f"{res['student_ce']['test_accuracy']:.4f}.")
    else:
        lines.append("CE-only student: not trained in this mode (time budget).")
    secs = res.get("stage_seconds", {})
    lines.append("wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in secs.items() if v is not None)
                 + f"; whole run {res.get('wall_seconds')} s wall, {res.get('cpu_seconds')} s CPU.")
    return lines


def markdown(res: dict) -> str:
    """``demo.md``: settings, machine, the table, the summary lines, per-stage wall times."""
    m, c, d = res.get("machine", {}), res["config"], res["data"]
    la = res.get("load_average_1min", {})
    lines = [
        "# kdengine demo" + (" (--quick)" if c["quick"] else ""),
        "",
        f"- Date {m.get('date', '?')}; machine: {m.get('cpu', '?')} ({m.get('cores', '?')} cores), "
        f"{c['threads']} torch threads; python {m.get('python', '?')}, torch {m.get('torch', '?')}, "
        f"triton {m.get('triton', '?')}; {', '.join(f'{k} {v}' for k, v in res.get('versions', {}).items())}; "
        f"platform {m.get('platform', '?')}; 1-min load average "
        f"{la.get('start', '?')} at start, {la.get('end', '?')} at end.",
        f"- Backends: {res.get('setup', {}).get('backends', {})}.",
        f"- Data: {d['dataset']}; {d['split']}.",
        f"- Teacher: {res['teacher']['architecture']}, {res['teacher']['train']['loss']}, "
        f"{res['teacher']['train']['epochs']} epochs, lr {res['teacher']['train']['lr']}.",
        f"- Students: {res['student']['architecture']} ({res['student']['train']['epochs']} epochs, "
        f"{res['student']['train']['loss']}); SNN's ANN: {res['snn_student']['architecture']} "
        f"({res['snn_student']['train']['epochs']} epochs, same loss); teacher frozen, its logits cached "
        f"once; {res['student']['train']['optimizer']}, batch {c['batch']}.",
        "- Settings: learning rates, kd weight and temperature were picked by a small sweep (lr 5e-3 / 1e-2, "
        "kd weight 0 / 0.5 / 0.7 / 0.9 at T=4, T 2 / 8 at 0.7; 6 epochs, seed 0) scored on the held-out split, "
        "never on the test images; on that split KD did not beat cross-entropy alone either (the differences "
        "were within about 0.6 points on 1,000 images).",
        "- Why two students: the crossbar and the XNOR runtime need binary *activations* (a crossbar row is "
        "driven by +-1), while ANN -> SNN conversion needs ReLU activations (a spike rate codes a "
        "non-negative value); both are distilled from the same teacher with the same fused kd_loss.",
        "",
        format_table(res["table"], markdown=True),
        "",
        "Notes per row: " + "; ".join(f"**{r['model']}**: {r['note']}" for r in res["table"] if r["note"]) + ".",
        "",
    ]
    lines += [f"- {s}" for s in summary_lines(res)]
    secs, cpus = res.get("stage_seconds", {}), res.get("stage_cpu_seconds", {})
    if secs:
        lines += ["", "| stage | wall s | CPU s |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {cpus.get(k, '-')} |" for k, v in secs.items()]
        lines += [f"| whole run | {res.get('wall_seconds')} | {res.get('cpu_seconds')} |"]
    lines += ["", "Latency: single test image, interleaved blocks of timed calls (p50/p99 nearest rank); "
              "the SNN row is one `run_snn` call per image with the early-exit rule (p50/p99 over the first "
              f"{res['snn']['latency_batch1_ms']['images']} test images). Crossbar rows are a simulation "
              "(no latency). Size: bytes of the weights as stored (fp32 state for torch models, the "
              "safetensors file for the packed model and the crossbar, the SNN module's state with its "
              "binary layers as packed bits).", ""]
    if res.get("files"):
        lines += ["Files written by this run under --out: " + ", ".join(res["files"]), ""]
    return "\n".join(lines)


def _bytes(v: int) -> str:
    return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} kB" if v >= 1e3 else f"{v} B"


def write_plot(res: dict, path: str) -> Optional[str]:
    """``demo.png``: accuracy / size / latency bars, SNN accuracy vs time step, crossbar accuracy vs
    ADC bits and vs bit-error rate. Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except Exception as exc:  # noqa: BLE001 - plotting is optional
        return f"no plot: matplotlib unavailable ({type(exc).__name__})"
    rows = res["table"]
    labels = [r["key"] for r in rows]
    fig, ax = plt.subplots(2, 3, figsize=(16, 8.5))
    a = ax[0, 0]
    accs = [100 * r["accuracy"] for r in rows]
    a.barh(labels, accs, color="tab:blue")
    a.set_xlim(max(0.0, min(accs) - 3), 100)
    a.set_xlabel("test accuracy (%)")
    a.invert_yaxis()
    for i, v in enumerate(accs):
        a.text(v, i, f" {v:.2f}", va="center", fontsize=7)
    a = ax[0, 1]
    sizes = [r["size bytes"] for r in rows]
    a.barh(labels, sizes, color="tab:green")
    a.set_xscale("log")
    a.set_xlim(min(sizes) / 2, max(sizes) * 8)
    a.xaxis.set_minor_formatter(NullFormatter())
    a.set_xlabel("size (bytes, log)")
    a.invert_yaxis()
    for i, v in enumerate(sizes):
        a.text(v, i, f" {_bytes(v)}", va="center", fontsize=7)
    a = ax[0, 2]
    lat = [(r["key"], r["batch-1 p50 ms"], r["batch-1 p99 ms"]) for r in rows if r["batch-1 p50 ms"] is not None]
    fl = res["runtime"]["latency_batch1_ms"]["student_float_eager"]
    lat.insert(2, ("student fp32 arch", fl["p50_ms"], fl["p99_ms"]))
    a.barh([k for k, _, _ in lat], [v for _, v, _ in lat], color="tab:orange", label="p50")
    a.scatter([p for _, _, p in lat], [k for k, _, _ in lat], marker="|", color="k", s=80, label="p99")
    for i, (_, p50, p99) in enumerate(lat):
        a.text(max(p50, p99), i, f"  p50 {p50:.3g} / p99 {p99:.3g} ms", va="center", fontsize=7)
    a.set_xscale("log")
    a.set_xlim(min(v for _, v, _ in lat) / 2, max(p for _, _, p in lat) * 30)
    a.xaxis.set_minor_formatter(NullFormatter())
    a.set_xlabel("batch-1 latency (ms, log)")
    a.legend(fontsize=7)
    a.invert_yaxis()
    n = res["snn"]
    a = ax[1, 0]
    tb, tt = n["trace_baseline"], n["trace_tuned"]
    a.plot(range(1, len(tb) + 1), [100 * v for v in tb], ":", label="SNN p99.9 (no cuts)")
    a.plot(range(1, len(tt) + 1), [100 * v for v in tt], "-", label="SNN + scaling search")
    a.axhline(100 * n["ann_test_accuracy"], color="k", lw=0.8, ls="--", label="its ANN")
    ee = n["early_exit"]
    if ee.get("rule"):
        a.plot([ee["mean_steps_used"]], [100 * ee["test_accuracy"]], "*", ms=12, color="tab:red",
               label=f"+ early exit (mean steps, cap {ee['cap']})")
    a.set_xscale("log", base=2)
    a.set_xlabel("time steps (log2)")
    a.set_ylabel(f"test accuracy (%), {n['n_test']} images")
    a.set_ylim(max(0, min(100 * min(tb + tt), 100 * n["ann_test_accuracy"]) - 2), 100)
    a.legend(fontsize=7, loc="lower right")
    a.set_title("binary SNN: accuracy vs time step", fontsize=9)
    x = res["crossbar"]
    a = ax[1, 1]
    bits = list(x["accuracy_vs_adc_bits"])
    a.plot([int(b) for b in bits], [100 * x["accuracy_vs_adc_bits"][b] for b in bits], "o-",
           label=f"{x['rows']} rows, 3-RMS window")
    a.axhline(100 * x["sweep_ideal_accuracy"], color="k", lw=0.8, ls=":", label="ideal ADC")
    a.set_xlabel("ADC bits")
    a.set_ylabel(f"test accuracy (%), {x['sweep_n_test']} images")
    a.legend(fontsize=7)
    a.set_title("crossbar: accuracy vs ADC resolution", fontsize=9)
    a = ax[1, 2]
    sweep = x["accuracy_vs_bit_error_rate_ideal_adc"]
    qs = list(sweep)
    xs = [float(q) if float(q) > 0 else 1e-5 for q in qs]
    per_q = [v if isinstance(v, list) else [v] for v in (sweep[q] for q in qs)]
    n_seeds = max(len(v) for v in per_q)
    if n_seeds == 1:  # one flip seed: points, not a trend line
        a.plot(xs, [100 * v[0] for v in per_q], "o", ms=7, linestyle="none",
               label=f"ideal ADC, 1 seed (flip seed {res['config']['seed']})")
    else:
        for j in range(n_seeds):
            pts = [(xq, 100 * v[j]) for xq, v in zip(xs, per_q) if j < len(v)]
            a.plot([p[0] for p in pts], [p[1] for p in pts], "o", alpha=0.6, linestyle="none", color="tab:blue",
                   label=f"ideal ADC, {n_seeds} seeds (one marker each; number: mean)" if j == 0 else None)
    for xq, v in zip(xs, per_q):
        a.annotate(f"{100 * sum(v) / len(v):.1f}", (xq, 100 * max(v)), textcoords="offset points",
                   xytext=(0, 6), ha="center", fontsize=7)
    flat = [100 * u for v in per_q for u in v]
    a.set_ylim(min(flat) - 1.0, max(flat) + 0.8)
    a.set_xscale("log")
    a.set_xlim(xs[0] / 3, xs[-1] * 3)
    a.set_xticks(xs)
    a.set_xticklabels(["0"] + [f"{float(q):g}" for q in qs[1:]] if float(qs[0]) == 0 else [f"{float(q):g}" for q in qs])
    a.set_xlabel("stored-bit error rate")
    a.set_ylabel(f"test accuracy (%), {x['sweep_n_test']} images")
    a.legend(fontsize=7)
    a.set_title("crossbar: accuracy vs stored-bit flips", fontsize=9)
    m = res.get("machine", {})
    fig.suptitle(f"kdengine demo{' (--quick)' if res['config']['quick'] else ''} - MNIST, {m.get('cpu', '?')}, "
                 f"{res['config']['threads']} threads, {m.get('date', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write_text(res: dict, out_dir: str) -> list[str]:
    """Write ``demo.json`` and ``demo.md`` under ``out_dir``; returns their paths."""
    pj, pm = os.path.join(out_dir, "demo.json"), os.path.join(out_dir, "demo.md")
    with open(pj, "w") as f:
        json.dump(res, f, indent=1)
    with open(pm, "w") as f:
        f.write(markdown(res))
    return [pj, pm]
