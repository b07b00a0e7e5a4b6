"""pytest-benchmark suites: `python -m pytest benches --benchmark-only` (not part of CI's tests).

Sizes: KDENGINE_BENCH_QUICK=1 (small) or the full sizes of `kdengine bench`.
"""
import os

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
QUICK = os.environ.get("KDENGINE_BENCH_QUICK", "0") not in ("", "0")
