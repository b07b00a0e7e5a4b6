"""Reproductions and MNIST experiments, one registry: ``kdengine repro NAME`` (docs/papers.md).

Each entry is a function ``fn(args: ReproArgs) -> dict`` in a module of this package, registered
with :func:`register`. Modules are discovered with ``pkgutil.iter_modules`` over this package, so
adding ``kdengine/repro/<name>.py`` with a ``@register(...)`` function is all it takes::

    from kdengine.repro import ReproArgs, register

    @register("tinf", "KD as logits matching: the T -> inf limit (docs/papers.md section 1)",
              minutes=4, quick_minutes=1)
    def run(args: ReproArgs) -> dict:
        ...
        return {"table": markdown, "paths": {...}}

Shared helpers (data, training, mean +- std, result tables) live in :mod:`kdengine.repro.common`;
every result file is written by :mod:`kdengine.repro.results` (atomically). A returned dict may
carry ``"table"`` (markdown, printed) and ``"paths"`` (name -> written file).

Where results go: ``--out DIR``, by default ``./kdengine-results`` in the current directory. Only
``--record`` writes into the checkout's committed ``benches/results/`` (for maintainers), and a
``--quick`` run never does.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["ReproArgs", "register", "registry", "discover", "main", "DEFAULT_OUT", "checkout_results_dir"]

DEFAULT_OUT = Path("kdengine-results")
_NOT_ENTRIES = ("common", "results")   # helper modules of this package, no entries


@dataclass
class ReproArgs:
    """Options every reproduction receives.

    seeds: one run per seed (results are reported as mean +- std over them).
    quick: a much smaller/faster version for development and tests (not for reported numbers).
    out_dir: where the entry's ``<name>.json``, ``<name>.md`` and ``<name>.png`` are written.
    device: torch device string.
    started: ``time.perf_counter()`` when the run started (for the wall time in the results).
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    quick: bool = False
    out_dir: Path = DEFAULT_OUT
    device: str = "cpu"
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Entry:
    name: str
    description: str
    fn: Callable[[ReproArgs], dict]
    module: str
    minutes: float
    quick_minutes: float
    seeds: tuple[int, ...]
    record_subdir: str
    threads: Optional[int]

    def run_time(self) -> str:
        return f"~{_fmt_minutes(self.minutes)} (--quick ~{_fmt_minutes(self.quick_minutes)})"


def _fmt_minutes(m: float) -> str:
    return f"{m * 60:.0f} s" if m < 1 else f"{m:.0f} min"


_REGISTRY: dict[str, _Entry] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_DISCOVERED = False


def register(name: str, description: str, *, minutes: float, quick_minutes: float,
             seeds: tuple[int, ...] = (0, 1, 2), record_subdir: str = "repro", threads: Optional[int] = None
             ) -> Callable[[Callable[[ReproArgs], dict]], Callable[[ReproArgs], dict]]:
    """Decorator: register ``fn(args: ReproArgs) -> dict`` as ``kdengine repro <name>``.

    description: one line for ``--list``. minutes / quick_minutes: rough wall time of a full and of
    a ``--quick`` run on a 2-core CPU (shown by ``--list``). seeds: the default ``--seeds``.
    record_subdir: the folder under the checkout's ``benches/results/`` that ``--record`` writes.
    threads: run the entry with this many torch threads (tiny models: intra-op threads cost more
    than they give); None leaves the setting alone.
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"repro name must be a non-empty string without spaces, got {name!r}")
    if not isinstance(description, str) or not description or "\n" in description:
        raise ValueError(f"repro {name!r}: description must be one non-empty line")

    def deco(fn: Callable[[ReproArgs], dict]) -> Callable[[ReproArgs], dict]:
        old = _REGISTRY.get(name)
        if old is not None and old.module != fn.__module__:
            raise ValueError(f"repro {name!r} is already registered by {old.module}")
        _REGISTRY[name] = _Entry(name, description, fn, fn.__module__, float(minutes), float(quick_minutes),
                                 tuple(seeds), record_subdir, threads)
        return fn

    return deco


def discover() -> dict[str, str]:
    """Import every module of this package (except the helpers and private ones) so that their
    ``@register`` calls run. Returns module -> error message for modules that failed to import."""
    global _DISCOVERED
    if not _DISCOVERED:
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_") or info.name in _NOT_ENTRIES:
                continue
            mod = f"{__name__}.{info.name}"
            try:
                importlib.import_module(mod)
            except Exception as exc:  # a broken repro must not hide the others
                _IMPORT_ERRORS[mod] = f"{type(exc).__name__}: {exc}"
        _DISCOVERED = True
    return dict(_IMPORT_ERRORS)


def registry() -> dict[str, _Entry]:
    """name -> entry (``description``, ``fn``, ``module``, run times...) of every reproduction."""
    discover()
    return dict(sorted(_REGISTRY.items()))


def checkout_results_dir() -> Path:
    """The checkout's committed ``benches/results`` (the folder beside the ``kdengine`` package of
    a source checkout). Raises FileNotFoundError for an installed package without one."""
    d = Path(__file__).resolve().parents[2] / "benches" / "results"
    if not d.is_dir():
        raise FileNotFoundError(f"--record needs a source checkout with benches/results/; {d} does not exist")
    return d


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kdengine repro",
                                 description="Run a paper reproduction or MNIST experiment (see --list).")
    ap.add_argument("name", nargs="?", help="which entry to run (see --list)")
    ap.add_argument("--list", action="store_true",
                    help="list the entries with a one-line description and rough run time, and exit")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds, one run each (default: the entry's, shown by --list)")
    ap.add_argument("--quick", action="store_true",
                    help="small fast version for development and tests (numbers not for reporting)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"folder for the result files (default ./{DEFAULT_OUT} in the current directory)")
    ap.add_argument("--record", action="store_true",
                    help="write into the checkout's committed benches/results/ (for maintainers)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return ap


def _print_list(reg: dict[str, _Entry]) -> None:
    print(f"{'entry':<15} {'rough run time (2-core CPU)':<27} {'default seeds':<13} description")
    for name, e in reg.items():
        seeds = " ".join(str(s) for s in e.seeds)
        print(f"{name:<15} {e.run_time():<27} {seeds:<13} {e.description}")
    for mod, err in _IMPORT_ERRORS.items():
        print(f"(failed to import {mod}: {err})", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """``kdengine repro NAME [--seeds S ...] [--quick] [--out DIR | --record] [--device DEV]`` / ``--list``."""
    ap = _parser()
    a = ap.parse_args(argv)
    reg = registry()
    if a.list or not a.name:
        _print_list(reg)
        if not a.list and not a.name:
            print("\nusage: kdengine repro NAME [--seeds ...] [--quick] [--out DIR | --record]", file=sys.stderr)
            return 2
        return 0
    if a.name not in reg:
        print(f"unknown reproduction {a.name!r}; known: {', '.join(reg) or 'none'}", file=sys.stderr)
        for mod, err in _IMPORT_ERRORS.items():
            print(f"(failed to import {mod}: {err})", file=sys.stderr)
        return 2
    entry = reg[a.name]
    if a.record and a.quick:
        print("kdengine repro: error: --record cannot be used with --quick: a quick run is never "
              "committed (use --out DIR)", file=sys.stderr)
        return 2
    if a.record and a.out is not None:
        print("kdengine repro: error: --record and --out are exclusive (--record writes benches/results/)",
              file=sys.stderr)
        return 2
    if a.record:
        try:
            out_dir = checkout_results_dir() / entry.record_subdir
        except FileNotFoundError as exc:
            print(f"kdengine repro: error: {exc}", file=sys.stderr)
            return 2
    else:
        out_dir = a.out if a.out is not None else DEFAULT_OUT
    if out_dir.exists() and not out_dir.is_dir():
        print(f"kdengine repro: error: {out_dir} exists and is not a folder", file=sys.stderr)
        return 2
    seeds = list(a.seeds) if a.seeds is not None else list(entry.seeds)
    if not seeds:
        print("--seeds needs at least one seed", file=sys.stderr)
        return 2
    if len(entry.seeds) == 1 and len(seeds) > 1:
        print(f"kdengine repro: error: {a.name} runs one seed at a time, got --seeds {' '.join(map(str, seeds))}",
              file=sys.stderr)
        return 2
    args = ReproArgs(seeds=seeds, quick=a.quick, out_dir=out_dir, device=a.device)
    import torch

    threads = torch.get_num_threads()
    if entry.threads is not None:
        torch.set_num_threads(entry.threads)
    try:
        result: Any = entry.fn(args)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - args.started
    if isinstance(result, dict):
        if result.get("table"):
            print(result["table"])
        for _k, p in (result.get("paths") or {}).items():
            print(f"wrote {p}")
    print(f"repro {a.name}: {wall:.1f} s")
    return 0
