"""Binary-op benchmark: packed XNOR/AND popcount kernels against torch float baselines, same run.

CPU rows:

* ``xnor_matmul`` M x N x K = 1024 x 1024 x 4096 (quick: 512 x 512 x 4096) on the ``cpu`` backend vs
  ``torch.matmul`` in fp32 of the same shape; both counted in multiply-accumulates (a binary MAC is
  one sign product).
* ``spike_matmul`` (AND-popcount) on the same shape, same baseline.
* ``binary_linear`` at batch 1, 4096 -> 4096, activation packing included, vs ``F.linear`` fp32
  (``nn.Linear``): memory-bound, the packed weights are 32x fewer bytes.
* ``binary_conv2d`` (3x3, padding 1) vs ``F.conv2d`` fp32.
* ``binary_conv2d_packed_out``: a binary conv block between two binary layers (packed channel
  words in, 3x3 padding 1, per-channel scale and bias), output thresholded straight from the counts
  to packed words, vs the same conv plan with the float round trip (count -> float * scale + bias
  -> sign -> pack).
* ``binary_max_pool2d``: 2x2 max-pool on packed channel words (AND) vs ``F.max_pool2d`` fp32 on
  the float activations of the same shape.

Roofline. ``popcount_roofline_gmacs`` = threads x clock x W binary MACs per clock, i.e. one
W-bit XOR + popcount + accumulate per clock per core, with W the vector width of the path in use:
256 on AVX2, 512 on AVX-512 VPOPCNTDQ (one vpopcntq zmm per clock: it issues on one port on Ice
Lake / Sapphire Rapids). ``lut_bound_gmacs``
is the instruction-throughput bound of the algorithm actually used at these shapes, the table-lookup GEMM of
csrc/binary/xnor_lut.cpp: one vpshufb (+ one byte add) per 128 binary MACs, and vpshufb executes on 2
of the 4 vector pipes (Zen 3; Intel cores since Ice Lake also have 2 shuffle ports) = 256 MACs per
clock per core -- the same number as the popcount roofline, reached by another route. (The
nibble-LUT popcount kernel it replaced needed XOR + 2 shuffles + 2 adds per 256 MACs: 171 per
clock on 4 pipes.) The clock comes from a probe in
the native library (dependent adds timed with the thread's CPU clock), so it includes turbo.

Timings are wall-clock medians (``time_fn``) with all threads. On a shared machine those are noisy,
so the GEMM rows also carry a single-thread measurement in process CPU time (``*_1t_cpu``: the
best of several calls with ``torch.set_num_threads(1)``, for both sides), i.e. the per-core rate
when the core is not taken away, and the per-core roofline fraction from it.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from kdengine.bench.timing import progress, sync, time_fn

MACS_PER_SHUFFLE = 128  # 32 byte lanes x one 4-bit nibble each (csrc/binary/xnor_lut.cpp)
SHUFFLE_PIPES = 2


def _cpu_seconds_1t(fn: Callable[[], object], repeat: int) -> float:
    """Best process CPU time of one call with one thread (robust to preemption by other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
        return best
    finally:
        torch.set_num_threads(n)


def _clock_ghz() -> float | None:
    try:
        from kdengine import _native

        ops = _native.cpu_utils()
        return max(float(ops.binary_cpu_ghz(100_000_000)) for _ in range(3)) or None
    except Exception:  # noqa: BLE001 - no native library: no clock, no roofline
        return None


def _row(op: str, shape: str, backend: str, baseline: str, ours: dict, base: dict, macs: float,
         **extra) -> dict:
    row = {
        "suite": "binary", "op": op, "case": op, "shape": shape, "backend": backend,
        "impl": f"kdengine[{backend}]", "seconds": ours["median_s"], "median_s": ours["median_s"],
        "min_s": ours["min_s"], "baseline": baseline, "baseline_seconds": base["median_s"],
        "speedup": base["median_s"] / ours["median_s"], "threads": torch.get_num_threads(),
        "macs": macs, "gmacs": macs / ours["median_s"] / 1e9,
        "baseline_gmacs": macs / base["median_s"] / 1e9,
    }
    row.update(extra)
    return row


def _cpu_rows(quick: bool, repeat: int) -> list[dict]:
    from kdengine.ops.binary import (
        binary_conv2d,
        binary_linear,
        pack_signs,
        pack_spikes,
        spike_matmul,
        xnor_matmul,
    )

    rows: list[dict] = []
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    ghz = _clock_ghz()

    # --- GEMM: xnor and spike popcount vs fp32 matmul
    m = n = 512 if quick else 1024
    k = 4096
    x = torch.randn(m, k, generator=g)
    y = torch.randn(n, k, generator=g)
    a, b = pack_signs(x), pack_signs(y)
    s = pack_spikes((torch.rand(m, k, generator=g) < 0.2).float())
    macs = float(m * n * k)
    isa_name = _binary_isa_name()
    roof_bits = 512.0 if isa_name.startswith("avx512") else 256.0
    progress(f"binary GEMM {m}x{n}x{k}: torch fp32 matmul")
    base = time_fn(lambda: torch.matmul(x, y.T), repeat=repeat)
    base_1t = _cpu_seconds_1t(lambda: torch.matmul(x, y.T), repeat)
    for op, fn in (("xnor_matmul", lambda: xnor_matmul(a, b, backend="cpu")),
                   ("spike_matmul", lambda: spike_matmul(s, b, backend="cpu"))):
        progress(f"binary {op} {m}x{n}x{k}: kdengine[cpu] (torch fp32 matmul timed once before)")
        ours = time_fn(fn, repeat=repeat)
        ours_1t = _cpu_seconds_1t(fn, repeat)
        extra = {
            "seconds_1t_cpu": ours_1t, "baseline_seconds_1t_cpu": base_1t,
            "gmacs_1t_cpu": macs / ours_1t / 1e9, "baseline_gmacs_1t_cpu": macs / base_1t / 1e9,
            "speedup_1t_cpu": base_1t / ours_1t,
        }
        if ghz:
            roof = threads * ghz * roof_bits
            lut = threads * ghz * MACS_PER_SHUFFLE * SHUFFLE_PIPES
            extra.update({
                "clock_GHz": ghz, "binary_isa": isa_name, "roofline_bits_per_clock": roof_bits,
                "popcount_roofline_gmacs": roof,
                "roofline_fraction": macs / ours["median_s"] / 1e9 / roof,
                "lut_bound_gmacs": lut,
                "lut_bound_fraction": macs / ours["median_s"] / 1e9 / lut,
                "roofline_fraction_1t_cpu": macs / ours_1t / 1e9 / (roof / threads),
                "lut_bound_fraction_1t_cpu": macs / ours_1t / 1e9 / (lut / threads),
            })
        rows.append(_row(op, f"{m}x{n}x{k}", "cpu", "torch fp32 matmul", ours, base, macs, **extra))

    # --- batch-1 linear (packing of x included) vs nn.Linear fp32
    kin = nout = 4096
    w = torch.randn(nout, kin, generator=g)
    wp = pack_signs(w)
    scale = w.abs().mean(1)
    xv = torch.randn(1, kin, generator=g)
    lin = torch.nn.Linear(kin, nout, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)

    def torch_linear():
        with torch.no_grad():
            return lin(xv)

    ours_fn = lambda: binary_linear(xv, wp, scale, backend="cpu")  # noqa: E731
    progress(f"binary binary_linear 1x{kin}->{nout}: kdengine[cpu] and nn.Linear fp32")
    ours = time_fn(ours_fn, repeat=max(repeat, 20), warmup=3)
    base = time_fn(torch_linear, repeat=max(repeat, 20), warmup=3)
    rows.append(_row(
        "binary_linear", f"1x{kin}->{nout}", "cpu", "torch nn.Linear fp32", ours, base,
        float(kin * nout), weight_bytes=wp.nbytes, baseline_weight_bytes=w.numel() * 4,
        seconds_1t_cpu=_cpu_seconds_1t(ours_fn, 20),
        baseline_seconds_1t_cpu=_cpu_seconds_1t(torch_linear, 20),
    ))

    # --- binary conv2d 3x3 / padding 1 vs fp32 conv2d
    bsz, c, hw, o = (2, 64, 14, 64) if quick else (8, 128, 14, 128)
    xc = torch.randn(bsz, c, hw, hw, generator=g)
    wc = torch.randn(o, c, 3, 3, generator=g)
    wcp = pack_signs(wc.flatten(1))
    conv = lambda: binary_conv2d(xc, wcp, 3, padding=1, backend="cpu")  # noqa: E731
    tconv = lambda: F.conv2d(xc, wc, padding=1)  # noqa: E731
    progress(f"binary binary_conv2d {bsz}x{c}x{hw}x{hw}->{o}: kdengine[cpu] and conv2d fp32")
    ours = time_fn(conv, repeat=repeat)
    base = time_fn(tconv, repeat=repeat)
    rows.append(_row("binary_conv2d", f"{bsz}x{c}x{hw}x{hw}->{o} k3 p1", "cpu", "torch conv2d fp32",
                     ours, base, float(bsz * hw * hw * o * c * 9),
                     seconds_1t_cpu=_cpu_seconds_1t(conv, repeat),
                     baseline_seconds_1t_cpu=_cpu_seconds_1t(tconv, repeat)))
    return rows + _packed_rows(g, quick, repeat)


def _packed_rows(g: torch.Generator, quick: bool, repeat: int) -> list[dict]:
    """Packed-to-packed conv block vs its float round trip, and max-pool on words vs fp32."""
    from kdengine.ops.binary import (
        ConvGeometry,
        ConvPlan,
        binary_max_pool2d,
        pack_channels,
        pack_signs,
        sign_thresholds,
    )

    rows = []
    bsz, c, hw, o = (2, 64, 14, 64) if quick else (8, 128, 14, 128)
    xp = pack_channels(torch.randn(bsz, c, hw, hw, generator=g))
    wcp = pack_signs(torch.randn(o, c * 9, generator=g)).bits
    scale, bias = torch.randn(o, generator=g), torch.randn(o, generator=g)
    geo = ConvGeometry(bsz, c, hw, hw, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    plan = ConvPlan(wcp, geo, "cpu")
    table, flip = plan.signs_table(sign_thresholds(scale, bias, c * 9))

    def packed_out():
        return plan.run_signs(xp, table, flip)

    def float_round_trip():
        y = plan.run(xp, scale, bias, channels_last_out=True)
        return pack_channels(y, backend="cpu").bits

    assert torch.equal(packed_out(), float_round_trip())  # same bits, the tests do the full job
    progress(f"binary conv block {bsz}x{c}x{hw}x{hw}->{o}, packed in: thresholded out vs float round trip")
    ours, base = time_fn(packed_out, repeat=repeat), time_fn(float_round_trip, repeat=repeat)
    rows.append(_row("binary_conv2d_packed_out", f"{bsz}x{c}x{hw}x{hw}->{o} k3 p1", "cpu",
                     "same conv, count -> float -> sign -> pack", ours, base, float(bsz * hw * hw * o * c * 9),
                     seconds_1t_cpu=_cpu_seconds_1t(packed_out, repeat),
                     baseline_seconds_1t_cpu=_cpu_seconds_1t(float_round_trip, repeat)))

    bsz, c, hw = (4, 64, 28) if quick else (16, 128, 28)
    xf = torch.randn(bsz, c, hw, hw, generator=g)
    words = pack_channels(xf)
    pool = lambda: binary_max_pool2d(words, 2, backend="cpu")  # noqa: E731
    fpool = lambda: F.max_pool2d(xf, 2)  # noqa: E731
    progress(f"binary max-pool 2x2 {bsz}x{c}x{hw}x{hw}: on words vs fp32")
    ours, base = time_fn(pool, repeat=max(repeat, 20)), time_fn(fpool, repeat=max(repeat, 20))
    rows.append(_row("binary_max_pool2d", f"{bsz}x{c}x{hw}x{hw} k2 s2", "cpu", "torch max_pool2d fp32",
                     ours, base, float(bsz * c * (hw // 2) ** 2 * 4),
                     seconds_1t_cpu=_cpu_seconds_1t(pool, 20),
                     baseline_seconds_1t_cpu=_cpu_seconds_1t(fpool, 20)))
    return rows



def _gpu_rows(quick: bool, repeat: int) -> list[dict]:
    """Large square GEMM and batch-1 linear on the GPU backends vs cuBLAS fp16 and int8."""
    from kdengine import _dispatch
    from kdengine.ops.binary import binary_linear, pack_signs, xnor_matmul

    rows: list[dict] = []
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    size = 4096 if quick else 8192
    x = torch.randn(size, size, device=dev, generator=g)
    y = torch.randn(size, size, device=dev, generator=g)
    a, b = pack_signs(x), pack_signs(y)
    xh, yh = x.half(), y.half()
    xi, yi = x.sign().to(torch.int8), y.sign().to(torch.int8)
    macs = float(size) ** 3
    baselines = {"cuBLAS fp16": time_fn(lambda: xh @ yh.T, repeat=repeat, device=dev)}
    if hasattr(torch, "_int_mm"):
        baselines["torch._int_mm int8"] = time_fn(lambda: torch._int_mm(xi, yi.T), repeat=repeat, device=dev)
    w = pack_signs(y)
    xv = torch.randn(1, size, device=dev, generator=g)
    lin_base = time_fn(lambda: F.linear(xv.half(), yh), repeat=max(repeat, 20), device=dev)
    for backend in ("triton", "cuda"):
        if not _dispatch.backend_availability(backend, "cuda").available:
            continue
        progress(f"binary xnor_matmul {size}^3 / binary_linear 1x{size}: kdengine[{backend}]")
        ours = time_fn(lambda backend=backend: xnor_matmul(a, b, backend=backend), repeat=repeat, device=dev)
        for name, base in baselines.items():
            rows.append(_row("xnor_matmul", f"{size}x{size}x{size}", backend, name, ours, base, macs))
        ours_l = time_fn(lambda backend=backend: binary_linear(xv, w, backend=backend), repeat=max(repeat, 20),
                         device=dev)
        rows.append(_row("binary_linear", f"1x{size}->{size}", backend, "F.linear fp16", ours_l,
                         lin_base, float(size) ** 2))
    sync(dev)
    return rows


def run_binary_bench(quick: bool = False) -> list[dict]:
    """Rows ``{op, shape, backend, seconds, baseline, baseline_seconds, speedup, ...}``: one per
    comparison, CPU always (where the cpu backend builds), GPU rows where CUDA is available."""
    from kdengine import _dispatch

    repeat = 3 if quick else 7
    rows: list[dict] = []
    if _dispatch.backend_availability("cpu", "cpu").available:
        rows += _cpu_rows(quick, repeat)
    if torch.cuda.is_available():
        rows += _gpu_rows(quick, repeat)
    return rows


def _binary_isa_name() -> str:
    """The binary kernels' instruction-set path in use ("?" without the native library)."""
    try:
        from kdengine import _cpu_isa

        return _cpu_isa.isa_in_use("binary")[1]
    except Exception:  # noqa: BLE001 - no native library: the rows say "?"
        return "?"


def notes(rows: list[dict]) -> list[str]:
    """Neutral text lines: single-thread CPU-time ratios and the GEMMs' MAC rates against the
    popcount roofline and the table-lookup bound (module docstring)."""
    lines = []
    for r in rows:
        if r.get("suite") != "binary" or r["backend"] != "cpu":
            continue
        if "speedup_1t_cpu" in r:
            lines.append(f"{r['op']} {r['shape']}: {r['speedup_1t_cpu']:.1f}x in single-thread CPU time "
                         f"({r['gmacs_1t_cpu']:.0f} vs {r['baseline_gmacs_1t_cpu']:.1f} G MAC/s per core)")
        if "roofline_fraction" in r:
            lines.append(
                f"{r['op']} {r['shape']}: {r['gmacs']:.0f} G binary MAC/s wall = "
                f"{100 * r['roofline_fraction']:.0f} % of the popcount roofline "
                f"({r['popcount_roofline_gmacs']:.0f} G = {r['threads']} cores x "
                f"{r['clock_GHz']:.2f} GHz x {r.get('roofline_bits_per_clock', 256):.0f}, path "
                f"{r.get('binary_isa', '?')}), {100 * r['lut_bound_fraction']:.0f} % of the "
                f"AVX2 table-lookup bound ({r['lut_bound_gmacs']:.0f} G); per core, CPU time: "
                f"{100 * r['roofline_fraction_1t_cpu']:.0f} % / {100 * r['lut_bound_fraction_1t_cpu']:.0f} %"
            )
    return lines


if __name__ == "__main__":  # pragma: no cover
    from kdengine.bench.report import suite_main

    suite_main(run_binary_bench, notes)
