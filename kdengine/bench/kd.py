"""KD loss benchmark: kdengine vs torch eager vs torch.compile, fwd+bwd, same run, same inputs.

The byte floor is one read of student and teacher and one write of the gradient,
3 * N * V * bytes, over the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import torch

from kdengine.bench.timing import missing, peak_rss_delta, progress, time_fn

TEMPERATURE = 2.0
FULL_SHAPES = [(1024, 32000), (4096, 32000)]
QUICK_SHAPES = [(256, 8000)]


def torch_kd(s: torch.Tensor, t: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The baseline everyone writes: kl_div on log_softmax, T^2-scaled, batchmean."""
    return torch.nn.functional.kl_div(
        torch.log_softmax(s / temperature, dim=-1),
        torch.log_softmax(t / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature * temperature)


def kdengine_kd(s: torch.Tensor, t: torch.Tensor, temperature: float = TEMPERATURE,
                backend: str | None = None) -> torch.Tensor:
    import kdengine

    return kdengine.kd_loss(s, t, temperature, backend=backend)


def copy_bandwidth(nbytes: int = 256 << 20, device: str = "cpu") -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    r = time_fn(lambda: dst.copy_(src), repeat=5, warmup=2, device=device)
    return 2 * nbytes / r["min_s"]


def _fwd_bwd(loss_fn, s, t):
    def run():
        s.grad = None
        loss_fn(s, t).backward()

    return run


def run_kd_bench(quick: bool = False, shapes=None, dtype=torch.float32, repeat: int | None = None,
                 with_compile: bool = True, with_memory: bool = True) -> list[dict]:
    """Rows: one per (shape, implementation) with median seconds and speedups vs baselines."""
    from kdengine import _dispatch

    shapes = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    repeat = repeat or (3 if quick else 5)
    backend = _dispatch.resolve("kd_loss", torch.device("cpu"), "auto")
    bw = copy_bandwidth()
    rows: list[dict] = []
    for n, v in shapes:
        g = torch.Generator().manual_seed(0)
        s = (torch.randn(n, v, generator=g) * 3).to(dtype).requires_grad_(True)
        t = (torch.randn(n, v, generator=g) * 3).to(dtype)
        itemsize = s.element_size()
        floor_s = 3 * n * v * itemsize / bw
        impls = [
            (f"kdengine[{backend}]", lambda a, b: kdengine_kd(a, b, backend=backend)),
            ("torch eager", torch_kd),
        ]
        if with_compile:
            impls.append(("torch.compile", torch.compile(torch_kd)))
        results = {}
        for name, fn in impls:
            progress(f"kd_loss fwd+bwd {n}x{v}: {name}")
            # torch.compile's first call compiles: two warm-up runs keep that out of the timing.
            try:
                r = time_fn(_fwd_bwd(fn, s, t), repeat=repeat,
                            warmup=2 if name == "torch.compile" else 1)
            except Exception as exc:  # noqa: BLE001 - a baseline that fails is reported, not fatal
                if name.startswith("kdengine"):
                    raise
                missing("kd_loss", name, f"failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            results[name] = r["median_s"]
            rows.append({
                "suite": "kd_loss", "case": "fwd+bwd", "shape": f"{n}x{v}", "dtype": str(dtype)[6:],
                "impl": name, "median_s": r["median_s"], "min_s": r["min_s"], "repeat": repeat,
                "floor_s": floor_s, "copy_GBps": bw / 1e9,
            })
        ours = results[f"kdengine[{backend}]"]
        for row in rows[-len(results):]:
            row["kdengine_speedup"] = row["median_s"] / ours
        if with_memory:
            for row in rows[-len(results):]:
                impl = {"torch eager": "eager", f"kdengine[{backend}]": "kdengine"}.get(row["impl"])
                if impl is None:
                    continue
                progress(f"kd_loss fwd+bwd {n}x{v}: peak memory of {row['impl']} (fresh process)")
                peak = peak_rss_delta("kdengine.bench.kd_mem",
                                      ["--impl", impl, "--n", str(n), "--v", str(v)])
                row["peak_extra_MB"] = None if peak is None else peak / 2**20
    return rows


def notes(rows: list[dict]) -> list[str]:
    """Neutral text lines: the bytes kdengine moves per second against the copy bandwidth of the
    same run, and the peak extra memory of each implementation."""
    lines = []
    for shape in sorted({r["shape"] for r in rows if r.get("suite") == "kd_loss"}):
        by = {r["impl"]: r for r in rows if r.get("suite") == "kd_loss" and r["shape"] == shape}
        ours = next((r for k, r in by.items() if k.startswith("kdengine")), None)
        if ours is None:
            continue
        gbps = ours["floor_s"] * ours["copy_GBps"] / ours["median_s"]
        lines.append(f"KD fwd+bwd {shape}: {ours['impl']} moves {gbps:.1f} GB/s (read student and "
                     f"teacher, write the gradient), {100 * gbps / ours['copy_GBps']:.0f} % of the copy "
                     f"bandwidth measured in this run ({ours['copy_GBps']:.1f} GB/s)")
        mem = [f"{k} {r['peak_extra_MB']:.0f} MiB" for k, r in by.items() if r.get("peak_extra_MB") is not None]
        if mem:
            lines.append(f"KD fwd+bwd {shape}: peak extra RSS " + ", ".join(mem))
    return lines


if __name__ == "__main__":  # pragma: no cover
    out = run_kd_bench(quick=True)
    for row in out:
        print(row)
    print("\n".join(notes(out)))
