"""The C++ CPU kernels' instruction-set paths side by side, each forced in turn, same run, same inputs.

* ``xnor_matmul`` M x N x K = 1024 x 1024 x 4096 (quick: 512 x 512 x 4096) through every binary path
  this CPU has: portable, popcnt, avx2 (nibble-LUT panels), avx2-lut (table lookup, the previous
  best), avx512-vpopcntdq. Wall-clock medians with all threads, plus the best single-thread process
  CPU time of each (``seconds_1t_cpu``: robust to other jobs on a shared machine). The row of the
  path the kernels pick on their own is ``kdengine[cpu <path>]``; the others are its baselines.
* ``kd_loss`` forward + backward and forward alone (fp32 and bf16, T = 2, 1024 x 32000; quick
  256 x 8000) through every float path (portable, avx2-fma, avx512). Bandwidth: the bytes the op
  must move -- one read of student and teacher and one write of the student gradient, 3 N V x the
  element size -- over its time, against the copy bandwidth of the same run (a 256 MiB
  ``Tensor.copy_``, read + write counted), as a percentage of copy.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from kdengine.bench.binary import _cpu_seconds_1t
from kdengine.bench.kd import TEMPERATURE, copy_bandwidth
from kdengine.bench.timing import progress, time_fn


@contextlib.contextmanager
def _forced(family: str, isa: int, lut: bool | None = None) -> Iterator[None]:
    """The family's kernels on ``isa``; for binary AVX2 also the GEMM variant (lut or panels)."""
    from kdengine import testing

    knob = testing.binary_isa if family == "binary" else testing.float_isa
    with contextlib.ExitStack() as stack:
        stack.enter_context(knob(isa))
        if lut is not None:
            big = 1 << 40
            stack.enter_context(testing.binary_lut_min(*((1, 1) if lut else (big, big))))
        yield


def _binary_paths() -> list[tuple[str, int, bool | None]]:
    from kdengine import testing

    have = testing.binary_isas()
    paths = [("portable", 0, None), ("popcnt", 1, None), ("avx2", 2, False), ("avx2-lut", 2, True),
             ("avx512-vpopcntdq", 3, None)]
    return [p for p in paths if p[1] in have]


def _impl(name: str, best: str) -> str:
    return f"kdengine[cpu {name}]" if name == best else f"forced {name}"


def _xnor_rows(quick: bool, repeat: int) -> list[dict]:
    from kdengine import _cpu_isa
    from kdengine.ops.binary import pack_signs, xnor_matmul

    m = n = 512 if quick else 1024
    k = 4096
    g = torch.Generator().manual_seed(0)
    a, b = pack_signs(torch.randn(m, k, generator=g)), pack_signs(torch.randn(n, k, generator=g))
    macs = float(m * n * k)
    best = _cpu_isa.isa_in_use("binary")[1]
    if best == "avx2":
        best = "avx2-lut"  # what the auto path takes at this size
    rows = []
    for name, isa, lut in _binary_paths():
        fn: Callable[[], object] = lambda: xnor_matmul(a, b, backend="cpu")  # noqa: E731
        progress(f"isa xnor_matmul {m}x{n}x{k}: {name}")
        with _forced("binary", isa, lut):
            r = time_fn(fn, repeat=1 if isa == 0 else repeat)
            t1 = _cpu_seconds_1t(fn, 1 if isa == 0 else repeat)
        rows.append({"suite": "cpu_isa", "case": "xnor_matmul", "shape": f"{m}x{n}x{k}", "dtype": "bits",
                     "impl": _impl(name, best), "path": name, "median_s": r["median_s"], "min_s": r["min_s"],
                     "seconds_1t_cpu": t1, "gmacs": macs / r["median_s"] / 1e9,
                     "gmacs_1t_cpu": macs / t1 / 1e9, "threads": torch.get_num_threads()})
    return rows


def _kd_fwd_bwd(s: torch.Tensor, t: torch.Tensor) -> Callable[[], None]:
    import kdengine

    sg = s.clone().requires_grad_(True)

    def run():
        sg.grad = None
        kdengine.kd_loss(sg, t, TEMPERATURE, backend="cpu").backward()

    return run


def _kd_fwd(s: torch.Tensor, t: torch.Tensor) -> Callable[[], None]:
    import kdengine

    def run():
        with torch.no_grad():
            kdengine.kd_loss(s, t, TEMPERATURE, backend="cpu")

    return run


def _kd_rows(quick: bool, repeat: int) -> list[dict]:
    from kdengine import _cpu_isa, testing

    n, v = (256, 8000) if quick else (1024, 32000)
    best = _cpu_isa.isa_in_use("float")[1]
    names = {0: "portable", 2: "avx2-fma", 3: "avx512"}
    rows = []
    bw = copy_bandwidth()
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        s = (torch.randn(n, v, generator=g) * 3).to(dtype)
        t = (torch.randn(n, v, generator=g) * 3).to(dtype)
        nbytes = 3 * n * v * s.element_size()
        for isa in testing.float_isas():
            for case, fn in (("fwd+bwd", _kd_fwd_bwd(s, t)), ("fwd", _kd_fwd(s, t))):
                progress(f"isa kd_loss {case} {n}x{v} {str(dtype)[6:]}: {names[isa]}")
                with _forced("float", isa):
                    r = time_fn(fn, repeat=1 if isa == 0 else repeat)
                gbps = nbytes / r["median_s"] / 1e9
                rows.append({"suite": "cpu_isa", "case": f"kd_loss {case}", "shape": f"{n}x{v}",
                             "dtype": str(dtype)[6:], "impl": _impl(names[isa], best), "path": names[isa],
                             "median_s": r["median_s"], "min_s": r["min_s"], "bytes": nbytes,
                             "GBps": gbps, "copy_GBps": bw / 1e9, "copy_fraction": gbps * 1e9 / bw})
    return rows


def run_isa_bench(quick: bool = False) -> list[dict]:
    """Rows ``{suite: "cpu_isa", case, shape, dtype, impl, path, median_s, ...}``: one per
    (case, forced path); none where the C++ kernels are not built."""
    from kdengine import _dispatch

    if not _dispatch.backend_availability("cpu", "cpu").available:
        return []
    repeat = 3 if quick else 5
    return _xnor_rows(quick, repeat) + _kd_rows(quick, repeat)


def notes(rows: list[dict]) -> list[str]:
    """Neutral text lines: each forced path's rate, relative to the table-lookup AVX2 GEMM
    (binary) or to the copy bandwidth of the run (KD)."""
    lines = []
    xnor = [r for r in rows if r.get("suite") == "cpu_isa" and r["case"] == "xnor_matmul"]
    lut = next((r for r in xnor if r["path"] == "avx2-lut"), None)
    for r in xnor:
        rel = f", {lut['seconds_1t_cpu'] / r['seconds_1t_cpu']:.2f}x avx2-lut" if lut else ""
        lines.append(f"xnor_matmul {r['shape']} {r['path']}: {r['gmacs']:.0f} G binary MAC/s "
                     f"({r['threads']} threads), {r['gmacs_1t_cpu']:.0f} per thread (1-thread CPU time{rel})")
    for r in rows:
        if r.get("suite") == "cpu_isa" and r["case"].startswith("kd_loss"):
            lines.append(f"{r['case']} {r['shape']} {r['dtype']} {r['path']}: {r['GBps']:.1f} GB/s of "
                         f"{r['bytes'] / 1e6:.0f} MB moved, {100 * r['copy_fraction']:.0f} % of the copy "
                         f"bandwidth of this run ({r['copy_GBps']:.1f} GB/s)")
    return lines


if __name__ == "__main__":  # pragma: no cover
    from kdengine.bench.report import suite_main

    suite_main(run_isa_bench, notes)
