"""KD loss fwd+bwd: kdengine vs torch eager vs torch.compile, grouped by shape so
pytest-benchmark prints them side by side (baselines measured in the same run)."""
import pytest
import torch

from benches.conftest import QUICK
from kdengine.bench.kd import FULL_SHAPES, QUICK_SHAPES, kdengine_kd, torch_kd

SHAPES = QUICK_SHAPES if QUICK else FULL_SHAPES
_compiled = torch.compile(torch_kd)
IMPLS = {"kdengine": kdengine_kd, "torch_eager": torch_kd, "torch_compile": _compiled}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_kd_fwd_bwd(benchmark, shape, impl):
    n, v = shape
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).requires_grad_(True)
    t = torch.randn(n, v, generator=g) * 3
    fn = IMPLS[impl]
    benchmark.group = f"kd_loss fwd+bwd {n}x{v}"

    def run():
        s.grad = None
        fn(s, t).backward()

    run()
    run()  # torch.compile compiles on the first call
    benchmark.pedantic(run, rounds=5, iterations=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["copy", "portable", "avx2", "avx512"])
def test_kd_isa_paths_vs_copy(benchmark, path, dtype):
    """kd_loss fwd+bwd with each float path forced, next to a copy of the bytes the op must move
    (read student and teacher, write the gradient: the copy moves the same 3 N V elements); the
    ratio of the two times is the fraction of the copy bandwidth reached."""
    from kdengine import testing

    n, v = SHAPES[0]
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    benchmark.group = f"kd_loss fwd+bwd {n}x{v} {str(dtype)[6:]} per forced CPU path vs copy"
    if path == "copy":  # 1.5 N V elements read + 1.5 N V written = the op's 3 N V
        src = torch.empty(3 * n * v // 2, dtype=dtype).uniform_()
        dst = torch.empty_like(src)
        benchmark.pedantic(lambda: dst.copy_(src), rounds=5, iterations=1, warmup_rounds=1)
        return
    isa = {"portable": testing.ISA_PORTABLE, "avx2": testing.ISA_AVX2, "avx512": testing.ISA_AVX512}[path]
    if isa not in testing.float_isas():
        pytest.skip(f"this CPU lacks the {path} path")

    def run():
        s.grad = None
        kdengine_kd(s, t).backward()

    with testing.float_isa(isa):
        benchmark.pedantic(run, rounds=1 if path == "portable" else 5, iterations=1, warmup_rounds=1)
