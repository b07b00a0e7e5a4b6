"""LLM-head KD fwd+bwd: fused-linear KD vs x@W.T + kdengine.kd_loss vs torch eager vs
torch.compile vs Liger's chunked loss (when installed), grouped by size so pytest-benchmark prints
them side by side. Small sizes (peak memory is measured by `kdengine bench --suite llm`)."""
import pytest

from benches.conftest import QUICK
from kdengine.bench.llm import COMPILE, LIGER, VARIANTS, liger_available, make_inputs, make_step

SIZE = dict(n=256, hs=256, ht=384, v=4000) if QUICK else dict(n=1024, hs=512, ht=768, v=16000)
_LIGER_OK, _LIGER_WHY = liger_available()


@pytest.mark.parametrize("impl", VARIANTS)
def test_llm_kd_fwd_bwd(benchmark, impl):
    if impl == LIGER and not _LIGER_OK:
        pytest.skip(f'{_LIGER_WHY} (to get it: pip install -e ".[bench]")')
    h, w, th, tw, labels = make_inputs(**SIZE)
    step = make_step(impl, h, w, th, tw, labels)
    benchmark.group = "llm fused-linear KD fwd+bwd " + " ".join(f"{k}={v}" for k, v in SIZE.items())
    step()
    if impl == COMPILE:
        step()  # torch.compile compiles on the first call
    benchmark.pedantic(step, rounds=3, iterations=1)
