"""GPU benchmark of the fused KD loss, forward + backward, all implementations in one run.

Implementations (same inputs, same T, batchmean, T^2-scaled forward KL):
  kdengine[triton]  kdengine.kd_loss(backend="triton"): one fused kernel writes loss and gradient
  torch eager       kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True) * T^2
  torch.compile     the same function compiled (optional: costs a compile)
  liger kldiv       liger_kernel.transformers.LigerKLDIVLoss(batchmean, log_target=True) on the
                    torch log_softmax outputs, * T^2 (if liger_kernel is importable)
  liger jsd(beta=0) liger_kernel.transformers.LigerJSD(beta=0.0) -- its fused forward-KL mode,
                    also on torch log_softmax outputs, * T^2 (if importable)

The byte floor is what a two-pass fused kernel must move: read student and teacher twice and
write the gradient once, 5 * N * V * itemsize bytes, at the device-to-device copy bandwidth
measured in the same run (a copy reads and writes, both counted). Times are CUDA-event medians.

Usage: ``python -m kdengine.bench.kd_gpu [--n 8192] [--v 128256] [--dtype bf16] [--compile]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable, Optional

import torch

from kdengine.bench.kd import torch_kd  # the eager baseline: what users write

TEMPERATURE = 2.0
DEFAULT_SHAPES = [(8192, 128256)]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_time(fn: Callable[[], object], repeat: int = 20, warmup: int = 3) -> dict:
    """Median/min milliseconds of ``fn()`` on the current CUDA stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def copy_bandwidth_cuda(nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written, per the best run)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    r = cuda_time(lambda dst=dst, src=src: dst.copy_(src), repeat=10, warmup=3)
    del src, dst
    return 2 * nbytes / (r["min_ms"] * 1e-3)


def kdengine_kd(s: torch.Tensor, t: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    import kdengine

    return kdengine.kd_loss(s, t, temperature, backend="triton")


def liger_impls(temperature: float = TEMPERATURE) -> tuple[list, list[str]]:
    """Liger-Kernel variants as (name, fn) plus notes on those that could not be built."""
    impls, notes = [], []
    try:
        from liger_kernel.transformers import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

        def liger_kldiv(s, t):
            return kl(torch.log_softmax(s / temperature, dim=-1),
                      torch.log_softmax(t / temperature, dim=-1)) * (temperature * temperature)

        impls.append(("liger kldiv", liger_kldiv))
    except Exception as exc:  # not installed, or an API change
        notes.append(f"liger kldiv skipped: {exc!r}")
    try:
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=0.0)  # beta = 0: KL(teacher || student), forward KL

        def liger_jsd(s, t):
            return jsd(torch.log_softmax(s / temperature, dim=-1),
                       torch.log_softmax(t / temperature, dim=-1)) * (temperature * temperature)

        impls.append(("liger jsd(beta=0)", liger_jsd))
    except Exception as exc:
        notes.append(f"liger jsd skipped: {exc!r}")
    return impls, notes


def run_gpu_bench(shapes: Optional[list] = None, dtype: torch.dtype = torch.bfloat16,
                  temperature: float = TEMPERATURE, repeat: int = 20,
                  with_compile: bool = False, with_liger: bool = True) -> list[dict]:
    """One row per (shape, implementation): median/min ms, peak extra memory, fraction of the
    byte floor, speedup of kdengine over it, and the loss difference to kdengine."""
    if not torch.cuda.is_available():
        raise RuntimeError("kd_gpu benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
    shapes = shapes or DEFAULT_SHAPES
    bw = copy_bandwidth_cuda()
    impls: list = [("kdengine[triton]", lambda a, b: kdengine_kd(a, b, temperature)),
                   ("torch eager", lambda a, b: torch_kd(a, b, temperature))]
    if with_compile:
        compiled = torch.compile(torch_kd)
        impls.append(("torch.compile", lambda a, b: compiled(a, b, temperature)))
    notes: list[str] = []
    if with_liger:
        extra, notes = liger_impls(temperature)
        impls += extra
    rows: list[dict] = []
    for n, v in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        s = (torch.randn(n, v, device="cuda", generator=g) * 3).to(dtype).requires_grad_(True)
        t = (torch.randn(n, v, device="cuda", generator=g) * 3).to(dtype)
        itemsize = s.element_size()
        floor_ms = 5 * n * v * itemsize / bw * 1e3
        results = {}
        ref_loss = None
        for name, fn in impls:

            def step(fn=fn, s=s, t=t):
                s.grad = None
                fn(s, t).backward()

            try:
                with torch.no_grad():
                    loss_val = float(fn(s, t).float())
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                r = cuda_time(step, repeat=repeat, warmup=3 if name == "torch.compile" else 2)
                peak = torch.cuda.max_memory_allocated() - base
            except Exception as exc:  # OOM or a peer's API change: report, keep going
                notes.append(f"{name} {n}x{v} failed: {exc!r}")
                continue
            if ref_loss is None:
                ref_loss = loss_val
            results[name] = r["median_ms"]
            rows.append({
                "suite": "kd_loss_gpu", "case": "fwd+bwd", "shape": f"{n}x{v}",
                "dtype": str(dtype).replace("torch.", ""), "impl": name,
                "median_ms": r["median_ms"], "min_ms": r["min_ms"], "repeat": repeat,
                "floor_ms": floor_ms, "floor_fraction": floor_ms / r["median_ms"],
                "copy_GBps": bw / 1e9, "peak_extra_GB": peak / 1e9, "loss": loss_val,
                "loss_rel_diff_vs_kdengine": abs(loss_val - ref_loss) / max(abs(ref_loss), 1e-30),
                "device": torch.cuda.get_device_name(),
            })
        s.grad = None
        del s, t
        ours = results.get("kdengine[triton]")
        for row in rows:
            if row["shape"] == f"{n}x{v}" and ours is not None:
                row["kdengine_speedup"] = row["median_ms"] / ours
    for note in notes:
        rows.append({"suite": "kd_loss_gpu", "note": note})
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Text lines: each impl's time, kdengine's time over the byte floor, the best Liger's ratio."""
    lines = []
    for r in rows:
        if "note" in r:
            lines.append(f"note: {r['note']}")
            continue
        lines.append(f"{r['shape']} {r['dtype']} {r['impl']:>18}: {r['median_ms']:8.2f} ms  "
                     f"({r['floor_fraction'] * 100:5.1f}% of the {r['floor_ms']:.2f} ms floor, "
                     f"{r.get('kdengine_speedup', float('nan')):.2f}x kdengine's time, "
                     f"+{r['peak_extra_GB']:.2f} GB, loss {r['loss']:.6g})")
    for shape in sorted({r["shape"] for r in rows if "shape" in r}):
        by = {r["impl"]: r for r in rows if r.get("shape") == shape}
        ours = by.get("kdengine[triton]")
        if ours is None:
            continue
        ratio = ours["median_ms"] / ours["floor_ms"]
        lines.append(f"{shape}: kdengine takes {ratio:.2f}x the byte floor's time")
        liger = [r for k, r in by.items() if k.startswith("liger")]
        if liger:
            best = min(liger, key=lambda r: r["median_ms"])
            sp = best["median_ms"] / ours["median_ms"]
            lines.append(f"{shape}: the best Liger ({best['impl']}) takes {sp:.2f}x kdengine's time")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=DEFAULT_SHAPES[0][0])
    ap.add_argument("--v", type=int, default=DEFAULT_SHAPES[0][1])
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--temperature", type=float, default=TEMPERATURE)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow start)")
    ap.add_argument("--no-liger", action="store_true")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kd_gpu: no CUDA GPU here; nothing to measure")
        return 1
    rows = run_gpu_bench([(args.n, args.v)], _DTYPES[args.dtype], args.temperature, args.repeat,
                         with_compile=args.compile, with_liger=not args.no_liger)
    for line in summary(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
