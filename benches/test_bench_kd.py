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
