"""Command line of the benchmarks: ``kdengine bench [--quick] [--suite NAME ...] [--out FILE]``.

Prints a line per case to stderr while it runs, then one table (kdengine against each baseline
measured in the same run; ratio = baseline time / kdengine time), neutral notes and one note per
baseline that could not be measured; writes the JSON (every row, machine, versions) and a PNG.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import time
from pathlib import Path

__all__ = ["SUITES", "DEFAULT_OUT", "add_arguments", "run_from_args", "run_suites"]

SUITES = ("kd", "binary", "spiking", "snn_memory", "infer", "llm", "isa")
DEFAULT_OUT = "bench-results/kdengine-bench.json"
RECORD_OUT = "benches/results/bench_cpu.json"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--quick", action="store_true",
                   help="small shapes (about a minute without the llm suite) instead of the full ones")
    p.add_argument("--suite", action="append", choices=list(SUITES), metavar="{" + ",".join(SUITES) + "}",
                   help="a suite to run; repeat for several (default: all). kd: KD loss; binary: XNOR/AND "
                   "popcount ops; spiking: multi-step IF, LIF and parametric LIF neurons; snn_memory: spiking-CNN "
                   "training memory vs T, memory-light BPTT vs plain autograd; infer: batch-1 packed-model latency; "
                   "llm: fused linear + KD at LLM-head sizes (slow); isa: the C++ CPU kernels' instruction-set "
                   "paths side by side (xnor_matmul, kd_loss GB/s vs copy)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile baselines (they compile on first use)")
    p.add_argument("--out", default=None,
                   help=f"JSON output path; the PNG goes next to it (default ./{DEFAULT_OUT}, "
                   f"or {RECORD_OUT} with --record)")
    p.add_argument("--record", action="store_true",
                   help=f"write the committed result file {RECORD_OUT} (and its PNG) of this checkout; "
                   "without this flag nothing under benches/results/ is written")
    p.add_argument("--no-progress", action="store_true", help="no per-case progress lines on stderr")
    return p


def _committed_results() -> Path:
    return (Path(__file__).resolve().parents[2] / "benches" / "results").resolve()


def _out_path(args: argparse.Namespace) -> Path:
    """The JSON path; refuses benches/results/ unless --record (raises ValueError)."""
    if args.record and args.out is None:
        return Path(__file__).resolve().parents[2] / RECORD_OUT
    out = Path(args.out or DEFAULT_OUT)
    committed = _committed_results()
    target = out.resolve()
    if not args.record and (target.parent == committed or committed in target.parents):
        raise ValueError(f"--out {out} is inside benches/results/ (the committed results); "
                         "add --record to write there")
    return out


class _Progress:
    """Writes ``[bench mm:ss] message`` lines to a stream."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        s = int(time.perf_counter() - self.t0)
        self.stream.write(f"[bench {s // 60:02d}:{s % 60:02d}] {message}\n")
        self.stream.flush()


def run_suites(suites: list[str], quick: bool, with_compile: bool, say=None) -> tuple[list[dict], list[str]]:
    """Run the suites in order; (rows, neutral notes)."""
    rows: list[dict] = []
    notes: list[str] = []
    for name in SUITES:
        if name not in suites:
            continue
        mod = importlib.import_module(f"kdengine.bench.{name}")
        if say:
            say(f"suite {name}: start")
        t0 = time.perf_counter()
        run = getattr(mod, f"run_{name}_bench")
        kw = {"with_compile": with_compile} if name in ("kd", "llm", "spiking") else {}
        suite_rows = run(quick=quick, **kw)
        rows += suite_rows
        notes += mod.notes(suite_rows)
        if say:
            say(f"suite {name}: {len(suite_rows)} rows in {time.perf_counter() - t0:.0f} s")
    return rows, notes


def run_from_args(args: argparse.Namespace) -> int:
    from kdengine.bench import report, timing

    try:
        out = _out_path(args)
    except ValueError as exc:
        print(f"kdengine bench: error: {exc}", file=sys.stderr)
        return 2
    suites = args.suite or list(SUITES)
    say = None if args.no_progress else _Progress()
    old = timing.set_progress(say)
    timing.take_missing()
    if args.no_compile and "kd" in suites:
        timing.missing("kd_loss", "torch.compile", "skipped (--no-compile)")
    try:
        rows, notes = run_suites(suites, args.quick, not args.no_compile, say)
    finally:
        timing.set_progress(old)
    missing = timing.take_missing()
    print(report.format_comparisons(rows))
    lines = notes + report.missing_notes(missing)
    if lines:
        print()
        for line in lines:
            print(textwrap.fill(line, report.WIDTH, subsequent_indent="    "))
    report.write_results(rows, out, notes, missing)
    chart = out.with_suffix(".png")
    print(f"\nwrote {out}" + (f" and {chart}" if report.write_chart(rows, chart) else ""))
    return 0

