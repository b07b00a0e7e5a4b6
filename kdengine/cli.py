"""`kdengine` command line: doctor, build, bench, repro, infer, demo."""
from __future__ import annotations

import argparse
import sys



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
    from kdengine.bench.command import run_from_args

    return run_from_args(args)


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
    from kdengine.bench.command import add_arguments as bench_arguments

    bench_arguments(p)
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
