"""Shared helpers of the reproductions: data, training (:func:`kdengine.train.fit`), mean +- std
over seeds, and the result files (JSON + markdown table + PNG plot, written by
:mod:`kdengine.repro.results`). The networks are :mod:`kdengine.models`.

Result files, for a reproduction ``name`` in ``out_dir``:

* ``name.json``: machine, date, data split, seeds, every per-seed row, the summary, notes;
* ``name.md``: a table of mean +- std over seeds per group (e.g. dataset x method), the machine,
  date, data split and the notes (which method beats vanilla KD and which does not);
* ``name.png``: a plot (default: bars of the primary metric with std error bars).
"""
from __future__ import annotations

import datetime
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from kdengine.repro.results import pyplot, save_figure, to_json, write_files
from kdengine.train import evaluate, fit, predict_logits

# --------------------------------------------------------------------------- data


def mnist_split(seed: int = 0, n_train: int = 8000) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The project's fixed MNIST split (of the 10k official test images, see kdengine.data):
    ``((x_train (n_train,1,28,28) float32 in [0,1], y_train int64), (x_test, y_test))``."""
    from kdengine.data import load_mnist

    tr = load_mnist(split="train", seed=seed, n_train=n_train)
    te = load_mnist(split="test", seed=seed, n_train=n_train)
    return (tr[0], tr[1]), (te[0], te[1])


def mnist_note(seed: int = 0, n_train: int = 8000) -> str:
    return (f"MNIST: the 10,000 official test images (LeCun, Cortes, Burges; CC BY-SA 3.0) split by a "
            f"seeded permutation (seed {seed}) into {n_train} train / {10000 - n_train} test; "
            "the 60k training set is not used")


def fashion_split(*, n_val: int = 5000, split_seed: int = 0, student_subset: int = 10_000,
                  quick_sizes: Optional[tuple[int, int, int, int]] = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The Fashion-MNIST parts a reproduction uses (see :func:`kdengine.data.load_fashion_mnist`):
    ``teacher_train`` (the official 60k train images less ``n_val``), ``student_train`` (a fixed
    ``student_subset`` of those), ``val`` (for every hyper-parameter choice) and ``test`` (the
    official 10k, reported only). ``quick_sizes`` = (teacher, student, val, test) keeps the first
    images of each part for a ``--quick`` run."""
    from kdengine.data import load_fashion_mnist

    parts = {
        "teacher_train": load_fashion_mnist("train", n_val=n_val, seed=split_seed),
        "student_train": load_fashion_mnist("train", n_val=n_val, seed=split_seed, subset=student_subset),
        "val": load_fashion_mnist("val", n_val=n_val, seed=split_seed),
        "test": load_fashion_mnist("test"),
    }
    if quick_sizes is not None:
        parts = {k: (x[:n], y[:n]) for (k, (x, y)), n in zip(parts.items(), quick_sizes)}
    return parts


def fashion_note(parts: Mapping[str, tuple[Tensor, Tensor]], *, n_val: int, split_seed: int) -> str:
    sizes = ", ".join(f"{k} {int(v[1].numel())}" for k, v in parts.items())
    return (f"Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; MIT license), official 60k/10k files: {n_val} of "
            f"the training images held out for validation (seed {split_seed}); sizes: {sizes}. "
            "Hyper-parameters are chosen on val, never on test")


# --------------------------------------------------------------------------- setup and training


def mnist_setup(args: Any, full: Mapping[str, Any], quick: Mapping[str, Any],
                quick_sizes: tuple[int, int] = (2000, 500)
                ) -> tuple[Mapping[str, Any], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A reproduction's recipe and MNIST split: ``(cfg, train, test)``; ``cfg`` is ``quick`` for a
    ``--quick`` run (which also keeps only the first ``quick_sizes`` = (train, test) images), else
    ``full``; the split is ``mnist_split(cfg["split_seed"])``."""
    cfg = quick if args.quick else full
    (xtr, ytr), (xte, yte) = mnist_split(cfg["split_seed"])
    if args.quick:
        (ntr, nte) = quick_sizes
        xtr, ytr, xte, yte = xtr[:ntr], ytr[:ntr], xte[:nte], yte[:nte]
    return cfg, (xtr, ytr), (xte, yte)


def train_model(model: nn.Module, train: tuple[Tensor, Tensor], losses: Any, *,
                test: Optional[tuple[Tensor, Tensor]] = None, device: str = "cpu", **fit_kw: Any) -> dict[str, Any]:
    """:func:`kdengine.train.fit` (cosine per epoch, SGD momentum 0.9 unless ``optimizer``) plus the
    eval-mode accuracy on the whole training set at the end (``train_acc``, in [0, 1])."""
    fit_kw.setdefault("optimizer", "sgd")
    out = fit(model, train, losses, test=test, device=device, **fit_kw)
    out["train_acc"] = evaluate(model, train, device=device)
    return out


def fit_recipe(model: nn.Module, train: tuple[Tensor, Tensor], losses: Any, cfg: Mapping[str, Any],
               seed: int, *, test: Optional[tuple[Tensor, Tensor]] = None, epochs_key: str = "student_epochs",
               lr_key: str = "lr", **fit_kw: Any) -> dict[str, Any]:
    """:func:`kdengine.train.fit` with a reproduction's recipe ``cfg`` (``cfg[epochs_key]`` epochs at
    ``cfg[lr_key]``, ``cfg["optimizer"]`` (default SGD momentum 0.9), ``cfg["batch_size"]``, cosine
    per epoch); ``fit_kw`` overrides. Returns ``time_s`` and, with ``test``, ``test_acc``."""
    kw: dict[str, Any] = dict(epochs=cfg[epochs_key], lr=cfg[lr_key], optimizer=cfg.get("optimizer", "sgd"),
                              batch_size=cfg["batch_size"], seed=seed, test=test)
    kw.update(fit_kw)
    r = fit(model, train, losses, **kw)
    return {k: r[k] for k in ("test_acc", "time_s") if k in r}


def fit_adam_steps(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, seed: int,
                   binary: bool, log: Callable[[str], Any] = print, batch_size: int = 128) -> dict[str, Any]:
    """The MNIST experiments' recipe through :func:`kdengine.train.fit`: CE, Adam, cosine decay per
    step to 0, batch 128; ``binary`` clips the latent weights after every step. Returns wall/CPU
    seconds and the last epoch's mean training loss."""
    r = fit(model, (x, y), epochs=epochs, lr=lr, optimizer="adam", schedule="step", batch_size=batch_size,
            seed=seed, binary=binary)
    for h in r["history"]:
        log(f"  epoch {h['epoch']}/{epochs}: train loss {h['loss']:.4f}")
    return {
        "train_seconds": round(r["time_s"], 2),
        # CPU time of this process: the compute cost, less sensitive than wall time to other
        # jobs sharing the cores
        "train_cpu_seconds": round(r["cpu_s"], 2),
        "final_train_loss": round(r["loss"], 4),
    }


class RunClock:
    """Wall/CPU time and load average of a whole run, stamped into its result dict."""

    def __init__(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.load0 = os.getloadavg()[0]

    def stamp(self, res: dict[str, Any]) -> dict[str, Any]:
        res["wall_seconds"] = round(time.perf_counter() - self.t0, 1)
        res["cpu_seconds"] = round(time.process_time() - self.c0, 1)
        res["load_average_1min"] = {"start": round(self.load0, 2), "end": round(os.getloadavg()[0], 2)}
        res["machine"] = _machine()
        return res


def cached_logits(model: nn.Module, x: Tensor, device: str = "cpu") -> Tensor:
    """Eval-mode logits of ``model`` on ``x`` (float32, no grad): a teacher cache."""
    return predict_logits(model, x, device=device)


def kd_backend(device: str = "cpu") -> str:
    """The kd_loss backend the KD terms of a repro resolve to on ``device`` (for the report)."""
    from kdengine import _dispatch

    return _dispatch.resolve("kd_loss", torch.device(device), None)


# --------------------------------------------------------------------------- statistics


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("mean_std needs at least one value")
    m = statistics.fmean(v)
    s = statistics.stdev(v) if len(v) > 1 else 0.0
    return m, s


def fmt_pm(m: float, s: float, *, scale: float = 1.0, digits: int = 2) -> str:
    """``"m ± s"`` (times ``scale``), fixed-point, or scientific for small non-zero values."""
    a, b = m * scale, s * scale
    if a != 0 and abs(a) < 10 ** (-digits):
        return f"{a:.{digits}e} ± {b:.1e}"
    return f"{a:.{digits}f} ± {b:.{digits}f}"


def summarize(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str],
              metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Group rows by ``group_by`` (in first-seen order) and give mean/std/n of each metric."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group_by), []).append(r)
    out = []
    for key, rs in groups.items():
        entry: dict[str, Any] = dict(zip(group_by, key))
        entry["n"] = len(rs)
        for m in metrics:
            vals = [r[m] for r in rs if m in r and r[m] is not None and not
                    (isinstance(r[m], float) and math.isnan(r[m]))]
            if vals:
                entry[f"{m}_mean"], entry[f"{m}_std"] = mean_std(vals)
        out.append(entry)
    return out


def compare_to(summary: Sequence[Mapping[str, Any]], *, baseline: str, metric: str = "test_acc",
               method_key: str = "method", within: Sequence[str] = ("dataset",),
               higher_is_better: bool = True, scale: float = 100.0, unit: str = " points") -> list[str]:
    """Plain-language notes: for each group in ``within``, does each method beat ``baseline``?

    A method "beats" the baseline when its mean is better; the note adds whether the difference
    is larger than the two standard deviations combined (sqrt(s1^2 + s2^2)), i.e. whether it is
    distinguishable from seed noise.
    """
    notes = []
    by_group: dict[tuple, list[Mapping[str, Any]]] = {}
    for e in summary:
        by_group.setdefault(tuple(e.get(k) for k in within), []).append(e)
    for g, entries in by_group.items():
        base = next((e for e in entries if e.get(method_key) == baseline), None)
        if base is None or f"{metric}_mean" not in base:
            continue
        where = ", ".join(f"{k}={v}" for k, v in zip(within, g))
        for e in entries:
            if e is base or f"{metric}_mean" not in e:
                continue
            d = e[f"{metric}_mean"] - base[f"{metric}_mean"]
            noise = math.hypot(e.get(f"{metric}_std", 0.0), base.get(f"{metric}_std", 0.0))
            better = d > 0 if higher_is_better else d < 0
            verdict = "beats" if better else "does NOT beat"
            sig = "larger than" if abs(d) > noise else "within"
            notes.append(f"[{where}] {e[method_key]} {verdict} {baseline}: "
                         f"{d * scale:+.2f}{unit} ({sig} the combined seed std {noise * scale:.2f})")
    return notes


# --------------------------------------------------------------------------- result files


def _machine() -> dict[str, Any]:
    from kdengine.bench.machine import machine_info

    return machine_info()


def markdown_table(summary: Sequence[Mapping[str, Any]], group_by: Sequence[str],
                   metrics: Sequence[str], *, labels: Optional[Mapping[str, str]] = None,
                   scale: Optional[Mapping[str, float]] = None, digits: int = 2) -> str:
    labels = labels or {}
    scale = scale or {}
    head = list(group_by) + [labels.get(m, m) for m in metrics] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [str(e.get(k, "")) for k in group_by]
        for m in metrics:
            if f"{m}_mean" in e:
                cells.append(fmt_pm(e[f"{m}_mean"], e[f"{m}_std"], scale=scale.get(m, 1.0), digits=digits))
            else:
                cells.append("–")
        cells.append(str(e["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_bar_plot(ax: Any, summary: Sequence[Mapping[str, Any]], group_by: Sequence[str],
                     metric: str, scale: float = 1.0, ylabel: str = "") -> None:
    """Grouped bars of ``metric`` (mean, std error bars): first group key = x groups, the rest
    = bars within a group."""
    import numpy as np

    outer_key = group_by[0]
    outer = list(dict.fromkeys(e.get(outer_key) for e in summary))
    inner = list(dict.fromkeys(tuple(e.get(k) for k in group_by[1:]) for e in summary))
    width = 0.8 / max(len(inner), 1)
    x = np.arange(len(outer))
    lows = []
    for j, ik in enumerate(inner):
        means, stds = [], []
        for o in outer:
            e = next((e for e in summary if e.get(outer_key) == o
                      and tuple(e.get(k) for k in group_by[1:]) == ik), None)
            means.append(e[f"{metric}_mean"] * scale if e and f"{metric}_mean" in e else np.nan)
            stds.append(e[f"{metric}_std"] * scale if e and f"{metric}_std" in e else 0.0)
        lows += [m - s for m, s in zip(means, stds) if not np.isnan(m)]
        ax.bar(x + (j - (len(inner) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=" / ".join(str(v) for v in ik))
    ax.set_xticks(x)
    ax.set_xticklabels([str(o) for o in outer])
    if lows:
        hi = max(e[f"{metric}_mean"] * scale for e in summary if f"{metric}_mean" in e)
        lo = min(lows)
        pad = max((hi - lo) * 0.3, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(ylabel or metric)
    ax.legend(fontsize=7)


def write_results(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    title: str,
    group_by: Sequence[str] = ("dataset", "method"),
    metrics: Sequence[str] = ("test_acc",),
    labels: Optional[Mapping[str, str]] = None,
    scale: Optional[Mapping[str, float]] = None,
    data_note: str = "",
    notes: Sequence[str] = (),
    setup: Optional[Mapping[str, Any]] = None,
    extra_md: str = "",
    plot: bool | Callable[[Any, list[dict[str, Any]]], None] = True,
    wall_s: Optional[float] = None,
    seeds: Optional[Sequence[int]] = None,
    paired: Optional[Mapping[str, Any]] = None,
    departures: Sequence[str] = (),
    tuning: Sequence[str] = (),
) -> dict[str, Any]:
    """Write ``name.json``, ``name.md`` and ``name.png`` into ``out_dir`` (atomically).

    Args:
        rows: one dict per run (group keys, ``seed``, metrics).
        title: heading of the markdown file.
        group_by / metrics: the summary table's grouping and columns (mean +- std over seeds).
        labels / scale: column display names and multipliers (e.g. 100 for accuracies in %).
        data_note: the data and split, written verbatim.
        notes: plain-language findings (e.g. from :func:`compare_to`).
        setup: hyper-parameters etc., written to JSON and as a list in markdown.
        extra_md: more markdown appended (e.g. a second table).
        plot: True for the default bar chart of ``metrics[0]``, False for none, or
            ``fn(fig, summary)`` drawing on a matplotlib figure.
        paired: keyword arguments of :func:`kdengine.repro.stats.paired_comparisons` (``baseline``,
            ``metric``, ``within``...): every method against the baseline, paired by seed, with a
            confidence interval; a table and one sentence per method.
        departures: where this run departs from the paper's recipe, one line each.
        tuning: which hyper-parameters were chosen, on what data, one line each.

    Returns ``{"summary", "table", "paths"}``.
    """
    summary = summarize(rows, group_by, metrics)
    machine = _machine()
    table = markdown_table(summary, group_by, metrics, labels=labels, scale=scale)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# {title}", "",
          f"- machine: {machine.get('cpu')} ({machine.get('cores')} cores, torch {machine.get('torch')}, "
          f"{machine.get('torch_threads')} threads), gpu: {machine.get('gpu') or 'none'}",
          f"- date: {date}" + (f"; wall time {wall_s:.0f} s" if wall_s is not None else ""),
          f"- data: {data_note}" if data_note else "- data: see setup",
          f"- seeds: {list(seeds) if seeds is not None else sorted({r.get('seed') for r in rows if 'seed' in r})}; "
          "mean ± sample std over seeds", ""]
    if setup:
        md.append("Setup:")
        md += [f"- {k}: {v}" for k, v in setup.items()]
        md.append("")
    md += [table, ""]
    comparisons: list[dict[str, Any]] = []
    if paired:
        from kdengine.repro.stats import paired_comparisons

        comparisons = paired_comparisons(rows, **paired)
        md += [_render_paired(comparisons, paired), ""]
        notes = [c["note"] for c in comparisons] + list(notes)
    for heading, lines in (("Tuned (and on what)", tuning), ("Departures from the paper", departures)):
        if lines:
            md.append(f"{heading}:")
            md += [f"- {line}" for line in lines]
            md.append("")
    if notes:
        md.append("Findings:")
        md += [f"- {n}" for n in notes]
        md.append("")
    if extra_md:
        md += [extra_md, ""]
    files: dict[str, Any] = {}
    plt = pyplot() if plot else None
    if plt is not None:
        if callable(plot):
            fig = plt.figure(figsize=(9, 4))
            plot(fig, summary)
        else:
            fig, ax = plt.subplots(figsize=(7, 4))
            m0 = metrics[0]
            default_bar_plot(ax, summary, group_by, m0, scale=(scale or {}).get(m0, 1.0),
                             ylabel=(labels or {}).get(m0, m0))
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        files[f"{name}.png"] = save_figure(fig)
        md.append(f"![{name}]({name}.png)")
    payload = {
        "name": name, "title": title, "date": date, "machine": machine, "data": data_note,
        "setup": dict(setup or {}), "seeds": list(seeds) if seeds is not None else None,
        "wall_s": wall_s, "group_by": list(group_by), "metrics": list(metrics),
        "summary": summary, "rows": [dict(r) for r in rows], "notes": list(notes),
        "paired": comparisons, "tuning": list(tuning), "departures": list(departures),
        "extra_md": extra_md,
    }
    files[f"{name}.json"] = to_json(payload)
    files[f"{name}.md"] = "\n".join(md) + "\n"
    written = write_files(out_dir, files)
    paths = {n.rsplit(".", 1)[1]: p for n, p in written.items()}
    return {"summary": summary, "table": table, "paths": paths}


def paired_table(rows: Sequence[Mapping[str, Any]], paired: Mapping[str, Any]) -> str:
    """Markdown table of every method against ``paired["baseline"]``, paired by seed
    (``paired``: the keyword arguments of :func:`kdengine.repro.stats.paired_comparisons`)."""
    from kdengine.repro.stats import paired_comparisons

    return _render_paired(paired_comparisons(rows, **paired), paired)


def _render_paired(comparisons: Sequence[Mapping[str, Any]], paired: Mapping[str, Any]) -> str:
    within = list(paired.get("within", ()))
    method_key = paired.get("method_key", "method")
    unit = paired.get("unit", " points").strip()
    head = [*within, method_key, f"mean difference ({unit})", "95 % CI" if paired.get("confidence", 0.95) == 0.95
            else f"{100 * paired['confidence']:g} % CI", "seeds higher / lower", "per seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comparisons:
        ci = "-" if c["ci_low"] is None else f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"
        cells = [*(str(c[k]) for k in within), str(c[method_key]), f"{c['mean']:+.2f}", ci,
                 f"{c['wins']} / {c['losses']}", " ".join(f"{d:+.2f}" for d in c["differences"])]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"Paired by seed against {paired['baseline']} ({paired['metric']}):\n\n" + "\n".join(lines))


def write_mnist_results(name: str, rows: Sequence[Mapping[str, Any]], args: Any, cfg: Mapping[str, Any],
                        **kw: Any) -> dict[str, Any]:
    """:func:`write_results` for a reproduction set up by :func:`mnist_setup`: into ``args.out_dir``,
    grouped by dataset x method, with the split (and the ``--quick`` subset), the wall time since
    ``args.started`` and the seeds filled in."""
    note = mnist_note(cfg["split_seed"]) + (" (quick: 2000/500 subset)" if args.quick else "")
    return write_results(name, rows, args.out_dir, group_by=("dataset", "method"), data_note=note,
                         wall_s=time.perf_counter() - args.started, seeds=args.seeds, **kw)
