"""What machine and versions a benchmark ran on (written into every result file)."""
from __future__ import annotations

import datetime
import os
import platform

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The features the C++ kernels choose their paths by (csrc/common/cpu_isa.h), as /proc/cpuinfo names them.
_FEATURES = ("popcnt", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vpopcntdq",
             "avx512_bitalg", "avx512_vnni", "avx512_bf16")


def _flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in _FEATURES if x in have]
    except OSError:
        pass
    return []


def machine_info() -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_flags": _flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    return info
