"""Child process for peak memory: prints the peak RSS growth of one fwd+bwd as JSON.

Inputs are allocated (and touched) first; then the kernel's peak-RSS counter is reset, so the
peak grows only by what the loss's forward and backward allocate on top of them (Linux only).
"""
from __future__ import annotations

import argparse
import json
import torch


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["eager", "kdengine"], required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--v", type=int, required=True)
    args = ap.parse_args()
    from kdengine.bench.kd import kdengine_kd, torch_kd

    fn = torch_kd if args.impl == "eager" else kdengine_kd
    if args.impl == "kdengine":  # build/load the extension and warm the allocator on a tiny call
        x = torch.randn(2, 8, requires_grad=True)
        kdengine_kd(x, torch.randn(2, 8)).backward()
    s = torch.randn(args.n, args.v).requires_grad_(True)
    t = torch.randn(args.n, args.v)
    before = _status_kb("VmRSS")
    _reset_peak()
    fn(s, t).backward()
    after = _status_kb("VmHWM")
    # The gradient itself (N x V) is the result, not overhead, but it is counted: both pay it.
    print(json.dumps({"peak_delta_bytes": after - before}))


if __name__ == "__main__":
    main()
