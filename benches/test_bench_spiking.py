"""Multi-step IF, LIF and parametric LIF neurons, CPU fp32, T = 16, N = 2^20 (KDENGINE_BENCH_QUICK=1:
N = 2^16): kdengine vs the best plain torch step loops (eager; for LIF also torch.compile) vs
SpikingJelly's IFNode / LIFNode / ParametricLIFNode (when installed), grouped so pytest-benchmark
prints them side by side (same run)."""
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


LIF_IMPLS = ["kdengine", "torch_loop", "torch_compile", "spikingjelly"]


def _lif_impl(name: str, parametric: bool):
    from kdengine.bench import spiking_lif

    if name == "kdengine":
        return spiking_lif.kdengine_lif
    if name == "torch_loop":
        return spiking_lif.torch_lif_loop
    if name == "torch_compile":
        return spiking_lif.torch_lif_loop_compiled
    node = spiking_lif.spikingjelly_node(parametric)
    if node is None:
        pytest.skip('spikingjelly is not installed (to get it: pip install -e ".[bench]")')

    def run(x, w=None):
        node.reset()
        return node(x)

    return run


@pytest.mark.parametrize("neuron", ["lif", "plif"])
@pytest.mark.parametrize("impl", LIF_IMPLS)
def test_lif_multistep_fwd_bwd(benchmark, impl, neuron):
    """LIF / parametric LIF (1/tau = sigmoid(w), dL/dw reduced too), SpikingJelly's default neuron
    (tau 2, hard reset to 0, sigmoid surrogate), forward + backward."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(T, N, generator=g) * 0.8 + 0.6).requires_grad_(True)
    gs = torch.randn(T, N, generator=g)
    w = torch.tensor(0.0, requires_grad=True) if neuron == "plif" else None
    fn = _lif_impl(impl, neuron == "plif")
    benchmark.group = f"{neuron}_multistep fwd+bwd T={T} N={N} fp32"

    def run():
        x.grad = None
        fn(x, w).backward(gs)

    run()  # first calls build / compile / warm caches
    run()
    benchmark.pedantic(run, rounds=3 if impl == "spikingjelly" else 5, iterations=1)
