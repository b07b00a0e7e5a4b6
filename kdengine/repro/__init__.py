"""Reproductions of the seed papers' experiments: ``kdengine repro NAME`` (PAPERS.md).

Each reproduction is a function ``fn(args: ReproArgs) -> dict`` in a module of this package,
registered with :func:`register`. Modules are discovered with ``pkgutil.iter_modules`` over this
package, so adding ``kdengine/repro/<name>.py`` with a ``@register(...)`` function is all it takes::

    from kdengine.repro import ReproArgs, register

    @register("tinf", "KD as logits matching: the T -> inf limit (PAPERS.md section 1)")
    def run(args: ReproArgs) -> dict:
        ...
        return {"table": markdown, "paths": {...}}

Shared helpers (models, training, mean +- std, result files) live in :mod:`kdengine.repro.common`.
A returned dict may carry ``"table"`` (markdown, printed) and ``"paths"`` (name -> written file).
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

__all__ = ["ReproArgs", "register", "registry", "discover", "main"]


@dataclass
class ReproArgs:
    """Options every reproduction receives.

    seeds: one run per seed (results are reported as mean +- std over them).
    quick: a much smaller/faster version for development and tests (not for reported numbers).
    out_dir: where ``<name>.json``, ``<name>.md`` and ``<name>.png`` are written.
    device: torch device string.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    quick: bool = False
    out_dir: Path = Path("benches/results/repro")
    device: str = "cpu"


@dataclass
class _Entry:
    name: str
    description: str
    fn: Callable[[ReproArgs], dict]
    module: str


_REGISTRY: dict[str, _Entry] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_DISCOVERED = False


def register(name: str, description: str) -> Callable[[Callable[[ReproArgs], dict]], Callable[[ReproArgs], dict]]:
    """Decorator: register ``fn(args: ReproArgs) -> dict`` as ``kdengine repro <name>``."""
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"repro name must be a non-empty string without spaces, got {name!r}")

    def deco(fn: Callable[[ReproArgs], dict]) -> Callable[[ReproArgs], dict]:
        old = _REGISTRY.get(name)
        if old is not None and old.module != fn.__module__:
            raise ValueError(f"repro {name!r} is already registered by {old.module}")
        _REGISTRY[name] = _Entry(name, description, fn, fn.__module__)
        return fn

    return deco


def discover() -> dict[str, str]:
    """Import every module of this package (except ``common`` and private ones) so that their
    ``@register`` calls run. Returns module -> error message for modules that failed to import."""
    global _DISCOVERED
    if not _DISCOVERED:
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_") or info.name == "common":
                continue
            mod = f"{__name__}.{info.name}"
            try:
                importlib.import_module(mod)
            except Exception as exc:  # a broken repro must not hide the others
                _IMPORT_ERRORS[mod] = f"{type(exc).__name__}: {exc}"
        _DISCOVERED = True
    return dict(_IMPORT_ERRORS)


def registry() -> dict[str, _Entry]:
    """name -> entry (``description``, ``fn``, ``module``) of every discovered reproduction."""
    discover()
    return dict(sorted(_REGISTRY.items()))


def main(argv: Optional[list[str]] = None) -> int:
    """``kdengine repro NAME [--seeds S ...] [--quick] [--out DIR] [--device DEV]`` / ``--list``."""
    ap = argparse.ArgumentParser(prog="kdengine repro",
                                 description="Run a reproduction of a seed paper's experiment.")
    ap.add_argument("name", nargs="?", help="which reproduction (see --list)")
    ap.add_argument("--list", action="store_true", help="list the reproductions and exit")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    ap.add_argument("--quick", action="store_true", help="small fast version (not for reporting)")
    ap.add_argument("--out", type=Path, default=Path("benches/results/repro"),
                    help="output directory (default benches/results/repro)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    a = ap.parse_args(argv)
    reg = registry()
    if a.list or not a.name:
        for name, e in reg.items():
            print(f"{name:<14} {e.description}")
        for mod, err in _IMPORT_ERRORS.items():
            print(f"(failed to import {mod}: {err})", file=sys.stderr)
        if not a.list and not a.name:
            print("\nusage: kdengine repro NAME [--seeds ...] [--quick] [--out DIR]", file=sys.stderr)
            return 2
        return 0
    if a.name not in reg:
        print(f"unknown reproduction {a.name!r}; known: {', '.join(reg) or 'none'}", file=sys.stderr)
        for mod, err in _IMPORT_ERRORS.items():
            print(f"(failed to import {mod}: {err})", file=sys.stderr)
        return 2
    if not a.seeds:
        print("--seeds needs at least one seed", file=sys.stderr)
        return 2
    args = ReproArgs(seeds=list(a.seeds), quick=a.quick, out_dir=a.out, device=a.device)
    t0 = time.perf_counter()
    result: Any = reg[a.name].fn(args)
    wall = time.perf_counter() - t0
    if isinstance(result, dict):
        if result.get("table"):
            print(result["table"])
        for k, p in (result.get("paths") or {}).items():
            print(f"wrote {p}")
    print(f"repro {a.name}: {wall:.1f} s")
    return 0
