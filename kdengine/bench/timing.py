"""Timing and memory helpers shared by the benchmark suites, and the two hooks a suite reports
through while it runs: :func:`progress` (one line per case, shown by ``kdengine bench``) and
:func:`missing` (a baseline that could not be measured, and why)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1,
            device: str = "cpu") -> dict:
    """Median/min wall time of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeat": repeat}


_progress: Callable[[str], None] | None = None
_missing: list[dict] = []


def set_progress(fn: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Install the function that :func:`progress` calls (None: silent); returns the previous one."""
    global _progress
    old, _progress = _progress, fn
    return old


def progress(message: str) -> None:
    """Report the case a suite is about to measure (a no-op unless :func:`set_progress` ran)."""
    if _progress is not None:
        _progress(message)


def missing(suite: str, baseline: str, why: str) -> None:
    """Record a baseline that a suite could not measure; :func:`take_missing` collects them."""
    entry = {"suite": suite, "baseline": baseline, "why": why}
    if entry not in _missing:
        _missing.append(entry)


def take_missing() -> list[dict]:
    """The baselines recorded by :func:`missing` since the last call (and forget them)."""
    out = list(_missing)
    _missing.clear()
    return out


def peak_from_child(cmd: list[str], timeout: float = 600, env: dict | None = None,
                    label: str = "") -> float | None:
    """Run ``cmd`` (a fresh process that prints one JSON line with ``peak_delta_bytes``) and
    return that number; None if the child failed (its stderr tail goes to stderr)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        sys.stderr.write(f"[bench] memory child {label or cmd[-1]!r} failed:\n{proc.stderr[-2000:]}\n")
        return None
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            return float(json.loads(line)["peak_delta_bytes"])
        except (ValueError, KeyError):
            continue
    return None


def peak_rss_delta(module: str, args: list[str], timeout: float = 600) -> float | None:
    """Peak RSS growth reported by ``python -m module args`` (see :func:`peak_from_child`)."""
    return peak_from_child([sys.executable, "-m", module, *args], timeout=timeout)
