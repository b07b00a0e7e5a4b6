"""Multi-step IF neuron, CPU fp32, T = 16, N = 2^20 (KDENGINE_BENCH_QUICK=1: N = 2^16): kdengine vs
the best plain torch in-place step loop vs SpikingJelly's IFNode (when installed), forward and
forward + backward, grouped so pytest-benchmark prints them side by side (same run)."""
import pytest
import torch

from benches.conftest import QUICK
from kdengine.bench.spiking import (
    FULL,
    QUICK as QUICK_SHAPE,
    kdengine_if,
    kdengine_if_fresh,
    spikingjelly_node,
    torch_if_loop,
    torch_if_loop_autograd,
)

T, N = QUICK_SHAPE if QUICK else FULL
IMPLS = ["kdengine", "kdengine_pool_off", "torch_loop", "spikingjelly"]


def _impl(name: str, case: str):
    if name == "kdengine":
        return kdengine_if
    if name == "kdengine_pool_off":  # fresh output memory every call, as the baselines get
        return kdengine_if_fresh
    if name == "torch_loop":
        return torch_if_loop if case == "fwd" else torch_if_loop_autograd
    node = spikingjelly_node()
    if node is None:
        pytest.skip('spikingjelly is not installed (to get it: pip install -e ".[bench]")')

    def run(x):
        node.reset()
        return node(x)

    return run


@pytest.mark.parametrize("case", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_if_multistep(benchmark, impl, case):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(T, N, generator=g) * 0.5 + 0.2).requires_grad_(case != "fwd")
    gs = torch.randn(T, N, generator=g)
    fn = _impl(impl, case)
    benchmark.group = f"if_multistep {case} T={T} N={N} fp32"

    if case == "fwd":
        def run():
            with torch.no_grad():
                fn(x)
    else:
        def run():
            x.grad = None
            fn(x).backward(gs)

    run()  # first calls build / warm caches
    benchmark.pedantic(run, rounds=3 if impl == "spikingjelly" else 5, iterations=1)
