"""`kdengine` command line: doctor, build, bench, repro, infer, demo."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


SUITES = ("kd", "binary", "spiking", "infer", "llm")


def _doctor(args: argparse.Namespace) -> int:
    import torch

    import kdengine
    from kdengine.bench.machine import machine_info

    info = machine_info()
    print(f"kdengine {kdengine.__version__}  torch {info['torch']}  triton {info['triton']}  "
          f"python {info['python']}")
    print(f"cpu: {info['cpu']} ({info['cores']} cores, {' '.join(info['cpu_flags'])})  "
          f"gpu: {info['gpu'] or 'none'}")
    report = kdengine.backends()
    for op, entries in report.items():
        print(f"\n{op}:")
        for name, e in entries.items():
            mark = "yes" if e["available"] else "no "
            print(f"  {name:<10} {mark}  {e['reason']}")
    auto = {d: kdengine._dispatch.resolve(op, torch.device(d), "auto")
            for op in report for d in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])}
    print(f"\nauto picks: {auto}")
    return 0


def _build(args: argparse.Namespace) -> int:
    import torch

    from kdengine import _native

    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() or args.cuda else [])
    rc = 0
    for kind in kinds:
        try:
            _native.load(kind, verbose=args.verbose)
            print(f"{kind}: built and loaded ({_native.cache_dir()})")
        except _native.NativeBuildError as exc:
            print(f"{kind}: FAILED: {exc}")
            rc = 1
    return rc


def _bench(args: argparse.Namespace) -> int:
    from kdengine.bench import kd
    from kdengine.bench.report import format_table, write_chart, write_results

    suites = args.suite or list(SUITES)
    rows: list[dict] = []
    notes: list[str] = []
    if "kd" in suites:
        kd_rows = kd.run_kd_bench(quick=args.quick, with_compile=not args.no_compile)
        rows += kd_rows
        notes += kd.check_targets(kd_rows)
    if "llm" in suites:
        from kdengine.bench import llm

        llm_rows = llm.run_llm_bench(quick=args.quick, with_compile=not args.no_compile)
        rows += llm_rows
        notes += llm.check_targets(llm_rows)
    for name in ("binary", "spiking", "infer"):
        if name in suites:
            mod = importlib.import_module(f"kdengine.bench.{name}")
            suite_rows = getattr(mod, f"run_{name}_bench")(quick=args.quick)
            rows += suite_rows
            notes += mod.check_targets(suite_rows)
    cols = ["suite", "case", "shape", "dtype", "impl", "median_s", "kdengine_speedup",
            "baseline", "speedup", "peak_extra_MB"]
    print(format_table(rows, cols))
    print()
    for line in notes:
        print(line)
    out = Path(args.out)
    write_results(rows, out, notes)
    chart = out.with_suffix(".png")
    print(f"\nwrote {out}" + (f" and {chart}" if write_chart(rows, chart) else ""))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kdengine.demo.command import run_from_args

    return run_from_args(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["repro"]:  # the repro registry owns its own arguments
        from kdengine.repro import main as repro_main

        return repro_main(argv[1:])
    if argv[:1] == ["infer"]:
        from kdengine.infer import infer_main

        return infer_main(argv[1:])
    ap = argparse.ArgumentParser(prog="kdengine", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("doctor", help="which backends can run each op here, and why not")
    p.set_defaults(fn=_doctor)
    p = sub.add_parser("build", help="compile the native (C++/CUDA) kernels ahead of time")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--cuda", action="store_true", help="also try the CUDA extension without a GPU")
    p.set_defaults(fn=_build)
    p = sub.add_parser("bench", help="benchmarks against baselines measured in the same run")
    p.add_argument("--quick", action="store_true", help="CI-sized shapes")
    p.add_argument("--suite", action="append", choices=list(SUITES),
                   help="suites to run (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", default="bench-results/kdengine-bench.json", help="JSON output path")
    p.set_defaults(fn=_bench)
    sub.add_parser("repro", help="paper reproductions: kdengine repro --list | NAME [--quick]")
    sub.add_parser("infer", help="run a packed model: kdengine infer MODEL INPUT [--batch N] [--json]")
    p = sub.add_parser("demo", help="the main job on MNIST: teacher -> KD binary student -> packed runtime, "
                                    "binary SNN, crossbar; one table and plots")
    from kdengine.demo.command import add_arguments

    add_arguments(p)
    p.set_defaults(fn=_demo)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
