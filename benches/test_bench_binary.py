"""Binary ops on CPU, grouped so pytest-benchmark prints kdengine next to its torch baseline
(same run, same shapes): XNOR GEMM 1024 x 1024 x 4096 vs fp32 matmul (KDENGINE_BENCH_QUICK=1:
512 x 512 x 4096) and a batch-1 4096 -> 4096 binary linear (activation packing included) vs
nn.Linear fp32; a binary conv block with thresholded packed output vs the same conv with a float
round trip (count -> float -> sign -> pack); max-pool on packed words vs fp32 max_pool2d. The
roofline summary is `python -m kdengine.bench.binary`."""
import pytest
import torch

from benches.conftest import QUICK
from kdengine import _dispatch
from kdengine.ops.binary import binary_linear, pack_signs, xnor_matmul

pytestmark = pytest.mark.skipif(
    not _dispatch.backend_availability("cpu", "cpu").available,
    reason=f"cpu backend: {_dispatch.backend_availability('cpu', 'cpu').reason}",
)

M = N = 512 if QUICK else 1024
K = 4096


@pytest.mark.parametrize("impl", ["kdengine_xnor", "torch_fp32"])
def test_gemm(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    benchmark.group = f"binary GEMM {M}x{N}x{K} (MACs: binary vs fp32)"
    if impl == "kdengine_xnor":
        a, b = pack_signs(x), pack_signs(y)
        out = xnor_matmul(a, b, backend="cpu")
        # a cheap exactness check on a corner of the result (the tests do the full job)
        exact = torch.where(x[:8] < 0, -1.0, 1.0) @ torch.where(y[:8] < 0, -1.0, 1.0).T
        assert torch.equal(out[:8, :8], exact.to(torch.int32))
        run = lambda: xnor_matmul(a, b, backend="cpu")  # noqa: E731
    else:
        run = lambda: torch.matmul(x, y.T)  # noqa: E731
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["kdengine_binary_linear", "torch_linear_fp32"])
def test_linear_batch1(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 4096, generator=g)
    x = torch.randn(1, 4096, generator=g)
    benchmark.group = "batch-1 linear 4096->4096 (packing of x included)"
    if impl == "kdengine_binary_linear":
        wp, scale = pack_signs(w), w.abs().mean(1)
        run = lambda: binary_linear(x, wp, scale, backend="cpu")  # noqa: E731
    else:
        lin = torch.nn.Linear(4096, 4096, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)

        def run():
            with torch.no_grad():
                return lin(x)
    benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["kdengine_packed_out", "float_round_trip"])
def test_conv_block_packed_output(benchmark, impl):
    from kdengine.ops.binary import ConvGeometry, ConvPlan, pack_channels, sign_thresholds

    g = torch.Generator().manual_seed(0)
    b, c, hw, o = (2, 64, 14, 64) if QUICK else (8, 128, 14, 128)
    xp = pack_channels(torch.randn(b, c, hw, hw, generator=g))
    w = pack_signs(torch.randn(o, c * 9, generator=g)).bits
    scale, bias = torch.randn(o, generator=g), torch.randn(o, generator=g)
    plan = ConvPlan(w, ConvGeometry(b, c, hw, hw, (3, 3), (1, 1), (1, 1), (1, 1)), "cpu")
    benchmark.group = f"binary conv block {b}x{c}x{hw}x{hw}->{o} k3 p1, packed words in and out"
    if impl == "kdengine_packed_out":
        table, flip = plan.signs_table(sign_thresholds(scale, bias, c * 9))
        run = lambda: plan.run_signs(xp, table, flip)  # noqa: E731
    else:
        run = lambda: pack_channels(plan.run(xp, scale, bias, channels_last_out=True), backend="cpu")  # noqa: E731
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["kdengine_words", "torch_fp32"])
def test_maxpool_words(benchmark, impl):
    from kdengine.ops.binary import binary_max_pool2d, pack_channels

    g = torch.Generator().manual_seed(0)
    b, c, hw = (4, 64, 28) if QUICK else (16, 128, 28)
    x = torch.randn(b, c, hw, hw, generator=g)
    benchmark.group = f"max-pool 2x2 {b}x{c}x{hw}x{hw}: packed words vs fp32"
    if impl == "kdengine_words":
        words = pack_channels(x)
        run = lambda: binary_max_pool2d(words, 2, backend="cpu")  # noqa: E731
    else:
        run = lambda: torch.nn.functional.max_pool2d(x, 2)  # noqa: E731
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


def _binary_path_ids() -> list[str]:
    from kdengine.bench.isa import _binary_paths

    try:
        return [p[0] for p in _binary_paths()]
    except Exception:  # noqa: BLE001 - no C++ library: the module's skip mark reports why
        return []


@pytest.mark.parametrize("path", _binary_path_ids())
def test_gemm_isa_paths(benchmark, path):
    """xnor_matmul with each instruction-set path this CPU has forced (portable, popcnt, avx2
    panels, avx2 table lookup, avx512-vpopcntdq), side by side in one group."""
    from kdengine.bench.isa import _binary_paths, _forced

    _, isa, lut = next(p for p in _binary_paths() if p[0] == path)
    g = torch.Generator().manual_seed(0)
    a, b = pack_signs(torch.randn(M, K, generator=g)), pack_signs(torch.randn(N, K, generator=g))
    benchmark.group = f"xnor_matmul {M}x{N}x{K} per forced CPU path"
    with _forced("binary", isa, lut):
        benchmark.pedantic(lambda: xnor_matmul(a, b, backend="cpu"), rounds=1 if isa == 0 else 5,
                           iterations=1, warmup_rounds=1)
