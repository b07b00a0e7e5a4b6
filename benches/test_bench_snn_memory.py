"""Spiking-CNN training step (kdengine.models.ConvSNN, batch 32, channels 16/32, fc 128; KDENGINE_BENCH_QUICK=1:
batch 8, channels 8/16, fc 64), T = 4 and 16, CPU fp32: memory-light BPTT vs plain autograd through the same
layers vs SpikingJelly's IFNode, grouped per T so pytest-benchmark prints them side by side (same run). The bytes
autograd keeps for the backward go into extra_info (``saved_MB``); the peak RSS per T comes from `kdengine bench
--suite snn_memory` (a fresh process per configuration)."""
import pytest

from benches.conftest import QUICK
from kdengine.bench.snn_memory import FULL, QUICK as QUICK_CFG, batch_of, build, saved_bytes, spikingjelly_if_factory, \
    train_step

CFG = QUICK_CFG if QUICK else FULL


@pytest.mark.parametrize("T", [4, 16])
@pytest.mark.parametrize("impl", ["light", "plain", "spikingjelly"])
def test_snn_training_step(benchmark, impl, T):
    if impl == "spikingjelly" and spikingjelly_if_factory() is None:
        pytest.skip('spikingjelly is not installed (to get it: pip install -e ".[bench]")')
    model = build(impl, T, CFG["channels"], CFG["hidden"])
    x, y = batch_of(CFG["batch"])
    benchmark.extra_info["saved_MB"] = saved_bytes(model, x, y) / 2**20
    benchmark.group = f"ConvSNN training step T={T} B={CFG['batch']} fp32"
    benchmark.pedantic(lambda: train_step(model, x, y), rounds=3, iterations=1, warmup_rounds=1)
