"""`kdengine` command line: doctor, build, bench, repro, infer, demo."""
from __future__ import annotations

import argparse
import sys



def _native_state(kind: str) -> str:
    """Whether the ``kind`` kernels are compiled in the cache, without compiling them."""
    from kdengine import _native

    try:
        _, build_dir, library = _native.build_paths(kind)
    except _native.NativeBuildError as exc:
        return str(exc)
    if _native._complete(build_dir, library):
        return f"compiled, cached in {build_dir}"
    return ("not compiled yet: the first use compiles them (once, about a minute); "
            "`kdengine build` does it ahead")


def _cpu_paths() -> dict[str, str]:
    """family -> name of the instruction-set path the C++ kernels take now ({} without them)."""
    from kdengine import _cpu_isa

    try:
        return {fam: _cpu_isa.isa_in_use(fam)[1] for fam in _cpu_isa.FAMILIES}
    except Exception:  # noqa: BLE001 - no C++ library here: the table says why
        return {}


def _doctor(args: argparse.Namespace) -> int:
    import torch

    import kdengine
    from kdengine import _cpu_isa
    from kdengine.bench.machine import machine_info

    info = machine_info()
    print(f"kdengine {kdengine.__version__}  torch {info['torch']}  triton {info['triton']}  "
          f"python {info['python']}")
    print(f"cpu: {info['cpu']} ({info['cores']} cores; {' '.join(info['cpu_flags']) or 'no AVX2'})"
          f"  gpu: {info['gpu'] or 'none'}")
    print(f"C++ kernels: {_native_state('cpu')}")
    report = kdengine.backends()  # compiles the C++ kernels if they are not yet (announced)
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    picks = {(op, d): kdengine._dispatch.resolve(op, torch.device(d), "auto")
             for op in report for d in devices}
    paths = _cpu_paths()
    if paths:
        print("cpu kernel paths: " + ", ".join(f"{fam} ops {name}" for fam, name in paths.items())
              + " (KDENGINE_CPU_PORTABLE=1 forces portable)")
    rows = []
    for op, entries in report.items():
        for name, e in entries.items():
            auto = ",".join(d for d in devices if picks[(op, d)] == name)
            family = _cpu_isa.family_of(kdengine._dispatch._NATIVE_OPS.get((op, name), ()))
            if name == "cpu" and e["available"] and family in paths:
                name = f"cpu ({paths[family]})"
            reason = " ".join(str(e["reason"]).split())
            if len(reason) > 200 and not args.verbose:
                reason = reason[:197] + "..."
            rows.append((op, name, "yes" if e["available"] else "no", auto, reason))
    header = ("op", "backend", "ok", "auto on", "why")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    print()
    print(fmt.format(*header))
    print(fmt.format(*("-" * w for w in widths), "---"))
    last = None
    for r in rows:
        print(fmt.format(r[0] if r[0] != last else "", *r[1:]))
        last = r[0]
    if any(r[4].endswith("...") for r in rows):
        print("\n(reasons cut at 200 characters; `kdengine doctor --verbose` prints them whole)")
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
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd is None:  # bare `kdengine`: say what there is, rather than an argparse error
        ap.print_help()
        return 0
    return args.fn(args)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (`repro` and `infer` parse their own arguments)."""
    ap = argparse.ArgumentParser(prog="kdengine", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    p = sub.add_parser("doctor", help="one table: which backend can run each op here, and why not")
    p.add_argument("--verbose", action="store_true",
                   help="print each reason whole (a failed build's reason holds its compiler log)")
    p.set_defaults(fn=_doctor)
    p = sub.add_parser("build", help="compile the native (C++/CUDA) kernels ahead of time")
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
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
    return ap


if __name__ == "__main__":
    sys.exit(main())
