"""What `kdengine bench` prints and writes: one comparison table (fits in 100 columns), neutral
notes, one note per baseline that could not be measured, the JSON with every row, and a PNG grid.

Every suite returns rows (dicts). :func:`comparisons` turns them into one record per
(case, baseline): kdengine's time, the baseline's time and ``ratio`` = baseline time / kdengine
time (``12.3x``: the baseline took 12.3 times as long). The JSON keeps the suites' full rows.
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Callable

from kdengine.bench.machine import machine_info

WIDTH = 100
INSTALL_HINT = 'pip install -e ".[bench]"'
_HOW = {  # how to get a missing baseline, by the start of its name
    "spikingjelly": f"{INSTALL_HINT} (installs spikingjelly)",
    "liger": f"{INSTALL_HINT} (installs liger-kernel)",
    "torch.compile": "drop --no-compile; torch.compile needs a working C++ compiler "
                     "(see `kdengine doctor`)",
}


# --------------------------------------------------------------------------- normalising rows


def _is_ours(impl: str) -> bool:
    return impl.startswith("kdengine")


_OP = {"kd_loss": "KD loss", "if_multistep": "IF neuron", "lif_multistep": "LIF neuron",
       "snn_memory": "SNN training step",
       "infer": "batch-1 latency", "llm": "LLM-head KD"}


def _case(r: dict) -> str:
    """The case inside its suite's section, short: pass and shape (op and shape for binary)."""
    suite = r.get("suite", "")
    if suite in ("kd_loss", "if_multistep", "lif_multistep"):
        return f"{r['case']} {r['shape']}"
    if suite == "binary":
        return f"{r['op']} {r['shape']}" + ("" if r.get("backend") == "cpu" else f" [{r['backend']}]")
    if suite == "infer":
        return r["case"].replace(" b1 ", " ")
    if suite == "llm":
        return r["shape"]
    if suite == "cpu_isa":
        return f"{r['case']} {r['shape']} {r['dtype']}"
    return f"{r.get('case', '')} {r.get('shape', '')}".strip()


def _record(ours: dict, baseline: str, baseline_seconds: float) -> dict:
    case = _case(ours)
    op = _OP.get(ours["suite"])
    return {"suite": ours["suite"], "case": case, "title": f"{op} {case}" if op else case,
            "impl": ours["impl"], "seconds": ours["median_s"], "baseline": baseline,
            "baseline_seconds": baseline_seconds, "ratio": baseline_seconds / ours["median_s"]}


def comparisons(rows: list[dict]) -> list[dict]:
    """One record per (case, baseline) with keys ``suite, case, title, impl, seconds, baseline,
    baseline_seconds, ratio`` (ratio = baseline time / kdengine time), in the order of ``rows``;
    rows without a time, and cases without a kdengine row, are skipped."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "median_s" not in r:
            continue
        if r.get("suite") == "binary":  # one row holds both sides
            groups[(id(r),)] = [r]
        else:
            groups.setdefault((r.get("suite"), r.get("case"), r.get("shape"), r.get("dtype")), []).append(r)
    out: list[dict] = []
    for members in groups.values():
        ours = next((r for r in members if _is_ours(r["impl"])), None)
        if ours is None:
            continue
        if ours.get("suite") == "binary":
            out.append(_record(ours, ours["baseline"], ours["baseline_seconds"]))
        out += [_record(ours, r["impl"], r["median_s"]) for r in members if r is not ours]
    return out


# --------------------------------------------------------------------------- text


def fmt_seconds(s: float) -> str:
    """``7.63 s``, ``33.0 ms``, ``0.311 ms``: three significant digits with a unit."""
    if s >= 1:
        return f"{s:.{1 if s >= 10 else 2}f} s"
    ms = s * 1e3
    return f"{ms:.{0 if ms >= 100 else 1 if ms >= 10 else 2 if ms >= 1 else 3}f} ms"


def fmt_ratio(r: float) -> str:
    """baseline time / kdengine time as ``12.3x`` (``0.91x`` when the baseline is faster)."""
    if r >= 100:
        return f"{r:.0f}x"
    if r >= 1:
        return f"{r:.1f}x"
    return f"{r:.2f}x"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


_SECTION = {"kd_loss": "KD loss, fp32, T=2, forward + backward, median wall time",
            "binary": "binary ops vs the same op in fp32 torch, median wall time",
            "if_multistep": "multi-step IF neuron, fp32, median wall time",
            "lif_multistep": "multi-step LIF / parametric LIF neuron, fp32, median wall time",
            "snn_memory": "spiking CNN training step (memory in the notes), fp32, median wall time",
            "infer": "batch-1 inference latency, p50 (p99 in the JSON)",
            "llm": "LLM-head KD (student head + KD loss), fp32, forward + backward",
            "cpu_isa": "C++ CPU kernels, the CPU's own path vs each forced path, median wall time"}


def format_comparisons(rows: list[dict], width: int = WIDTH) -> str:
    """The printed table: a section line per suite, then ``case | kdengine | baseline | time |
    ratio`` (ratio = baseline time / kdengine time); never wider than ``width``."""
    w_case, w_time, w_base, w_ratio = 36, 9, 27, 7
    rule = "-" * (w_case + w_time + w_base + w_time + w_ratio + 5)
    lines: list[str] = ["ratio = baseline time / kdengine time (12.3x: the baseline took 12.3 times as long)"]
    section = last_case = None
    for rec in comparisons(rows):
        if rec["suite"] != section:
            section, last_case = rec["suite"], None
            lines += ["", _clip(f"{_SECTION.get(section, section)}: {rec['impl']}", width),
                      f"{'case':<{w_case}} {'kdengine':>{w_time}}  {'baseline':<{w_base}} "
                      f"{'time':>{w_time}} {'ratio':>{w_ratio}}", rule]
        same = rec["case"] == last_case
        last_case = rec["case"]
        case = "" if same else _clip(rec["case"], w_case)
        ours = "" if same else fmt_seconds(rec["seconds"])
        lines.append(f"{case:<{w_case}} {ours:>{w_time}}  {_clip(rec['baseline'], w_base):<{w_base}} "
                     f"{fmt_seconds(rec['baseline_seconds']):>{w_time}} {fmt_ratio(rec['ratio']):>{w_ratio}}")
    return "\n".join(line[:width] for line in lines)


def format_columns(rows: list[dict], columns: list[str]) -> str:
    """Any rows as aligned text columns (for the suites' own ``python -m`` output)."""
    def cell(x: object) -> str:
        if isinstance(x, float):
            return f"{x:.0f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"
        return "" if x is None else str(x)

    cells = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def missing_notes(missing: list[dict]) -> list[str]:
    """One line per baseline that was not measured: which, why, and how to get it."""
    lines = []
    for m in missing:
        how = next((v for k, v in _HOW.items() if m["baseline"].lower().startswith(k)), None)
        lines.append(f"not measured: {m['baseline']} ({m['suite']}): {m['why']}"
                     + (f"; to get it: {how}" if how else ""))
    return lines


def write_results(rows: list[dict], path: Path, notes: list[str], missing: list[dict] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine_info(), "notes": notes, "missing_baselines": missing or [],
            "comparisons": comparisons(rows), "rows": rows}
    path.write_text(json.dumps(data, indent=2))


def suite_main(run: Callable[..., list[dict]], notes: Callable[[list[dict]], list[str]]) -> None:
    """``python -m kdengine.bench.<suite> [--quick]``: run, print the table and the notes."""
    import sys

    from kdengine.bench.timing import take_missing

    rows = run(quick="--quick" in sys.argv)
    print(format_comparisons(rows))
    print("\n".join(notes(rows) + missing_notes(take_missing())))


# --------------------------------------------------------------------------- figure


def machine_line(m: dict) -> str:
    """``AMD EPYC, 2 cores, 2 threads, torch 2.13.0+cpu, python 3.11.7, 2026-11-24``."""
    parts = [m.get("cpu", "?")]
    if m.get("gpu"):
        parts.append(m["gpu"])
    parts += [f"{m.get('cores', '?')} cores", f"{m.get('torch_threads', '?')} threads",
              f"torch {m.get('torch', '?')}", f"python {m.get('python', '?')}",
              str(m.get("date", "?"))[:10]]
    return ", ".join(parts)


def write_chart(rows: list[dict], path: Path, machine: dict | None = None) -> bool:
    """One PNG: a panel per case, kdengine and each baseline as horizontal bars (median time, ms,
    log scale), the time and the ratio written on each bar; machine and date in the title."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    recs = comparisons(rows)
    panels: dict[str, list[dict]] = {}
    for rec in recs:
        panels.setdefault(rec["title"], []).append(rec)
    if not panels:
        return False
    n = len(panels)
    ncols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 9 else 4
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols + 0.5, 2.3 * nrows + 0.9), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (label, sel) in zip(axes.flat, panels.items()):
        names = [sel[0]["impl"]] + [r["baseline"] for r in sel]
        secs = [sel[0]["seconds"]] + [r["baseline_seconds"] for r in sel]
        unit, scale = ("s", 1.0) if max(secs) >= 1 else ("ms", 1e3)
        times = [t * scale for t in secs]
        texts = [fmt_seconds(sel[0]["seconds"])] + [
            f"{fmt_seconds(r['baseline_seconds'])}  {fmt_ratio(r['ratio'])}" for r in sel]
        colors = ["tab:blue"] + ["tab:gray"] * len(sel)
        ypos = list(range(len(names)))
        ax.barh(ypos, times, color=colors, height=0.6)
        ax.set_yticks(ypos)
        ax.set_yticklabels([_clip(x, 28) for x in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        lo, hi = min(times), max(times)
        ax.set_xlim(lo / 3, hi * 30)
        ax.xaxis.set_minor_formatter(NullFormatter())
        for y, t, txt in zip(ypos, times, texts):
            ax.text(t * 1.08, y, txt, va="center", fontsize=8)
        ax.set_xlabel(f"median time per call ({unit}, log scale)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(textwrap.fill(label, 44), fontsize=9)
    m = machine or machine_info()
    fig.suptitle(f"kdengine bench: kdengine (blue) vs baselines measured in the same run; "
                 f"ratio = baseline time / kdengine time\n{machine_line(m)}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
