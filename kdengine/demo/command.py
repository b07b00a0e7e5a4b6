"""Command line of the demo: ``kdengine demo [--quick] [--out DIR] [--seed N] [--threads N]``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

__all__ = ["add_arguments", "run_from_args", "main"]


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _pos_int(s: str) -> int:
    v = _nonneg_int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from kdengine.demo.pipeline import DEFAULT_OUT

    p.add_argument("--quick", action="store_true", help="CI-sized run (< 1 minute): fewer images, epochs, steps")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for demo.json, demo.md, demo.png and the packed model (default ./{DEFAULT_OUT})")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the initialisations, data order and bit flips (the data split stays "
                   "load_mnist's fixed seed-0 split)")
    p.add_argument("--threads", type=_pos_int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from kdengine.demo import report
    from kdengine.demo.pipeline import run

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"kdengine demo: error: --out {args.out!r} exists and is not a folder", file=sys.stderr)
        return 2
    res = run(args.quick, out=args.out, progress=not args.no_progress, seed=args.seed, threads=args.threads)
    print()
    print(report.format_table(res["table"]))
    print()
    for line in report.summary_lines(res):
        print(line)
    print(f"\nwrote {', '.join(os.path.join(args.out, f) for f in res.get('files', []))}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="kdengine demo", description=__doc__.split("\n")[0]))
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
