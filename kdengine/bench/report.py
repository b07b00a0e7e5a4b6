"""Runs the benchmark suites, prints one table, writes JSON (+ a PNG chart when matplotlib is there)."""
from __future__ import annotations

import json
from pathlib import Path

from kdengine.bench.machine import machine_info


def _fmt(x: object) -> str:
    if isinstance(x, float):
        if x >= 100:
            return f"{x:.0f}"
        if x >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return "" if x is None else str(x)


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[c for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(rows: list[dict], path: Path, notes: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_info(), "notes": notes, "rows": rows}, indent=2))


def write_chart(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = sorted({(r["suite"], r["shape"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
    for ax, (suite, shape) in zip(axes[0], groups):
        sel = [r for r in rows if r["suite"] == suite and r["shape"] == shape]
        ax.barh([r["impl"] for r in sel], [r["median_s"] * 1e3 for r in sel], color="tab:blue")
        ax.set_xscale("log")
        ax.set_xlabel("median ms (log)")
        ax.set_title(f"{suite} {shape}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
