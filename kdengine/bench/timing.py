"""Timing and memory helpers shared by the benchmark suites."""
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


def peak_rss_delta(module: str, args: list[str], timeout: float = 600) -> float | None:
    """Run ``python -m module args`` in a fresh process that prints one JSON line with
    ``peak_delta_bytes``; return that number (None if the child failed)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        return None
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            return float(json.loads(line)["peak_delta_bytes"])
        except (ValueError, KeyError):
            continue
    return None
