"""Inference runtime, batch-1 CPU latency, grouped so pytest-benchmark prints kdengine.infer next to
the same network in fp32 torch eager (same run): the mlp-bin3 case of kdengine.bench.infer, MLP
784-4096-4096-4096-10 with its three hidden layers binary (weights and activations, mode "both";
the input binarized by BN + sign), classifier fp32 (KDENGINE_BENCH_QUICK=1: hidden 2048). The p50/p99 table is
`python -m kdengine.bench.infer` (or `kdengine bench`); pytest-benchmark reports min/median/mean per call here."""
import tempfile

import pytest
import torch

from benches.conftest import QUICK
from kdengine import _dispatch
from kdengine.bench.infer import _pack_and_load, mlp_pair

pytestmark = pytest.mark.skipif(
    not _dispatch.backend_availability("cpu", "cpu").available,
    reason=f"cpu backend: {_dispatch.backend_availability('cpu', 'cpu').reason}",
)

HIDDEN = 2048 if QUICK else 4096


@pytest.fixture(scope="module")
def networks():
    fnet, bnet = mlp_pair(HIDDEN, binary_input=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = _pack_and_load(bnet, tmp, "mlp")
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(model.predict(x), model.module(x))  # the runtime runs the packed model
    return fnet, model, x


@pytest.mark.parametrize("impl", ["kdengine_infer", "torch_eager_fp32", "packed_module_eager"])
def test_mlp_batch1_latency(benchmark, networks, impl):
    fnet, model, x = networks
    benchmark.group = f"batch-1 MLP 784-{HIDDEN}-{HIDDEN}-{HIDDEN}-10 (3 binary hidden layers vs fp32)"
    if impl == "kdengine_infer":
        run = lambda: model.predict(x)  # noqa: E731
    else:
        net = fnet if impl == "torch_eager_fp32" else model.module

        def run():
            with torch.inference_mode():
                return net(x)

    benchmark.pedantic(run, rounds=100 if not QUICK else 30, iterations=1, warmup_rounds=5)
