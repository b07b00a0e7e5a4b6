"""DDP: 2 CPU processes (gloo) reach the same weights as 1 process with the same global batch."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from kdengine.train import CrossEntropyTerm, Distiller, KDTerm, distributed as D

N, D_IN, C, GLOBAL_BATCH, EPOCHS = 101, 10, 4, 16, 2   # 101 = 6 * 16 + 5: last batch splits 2 / 3


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    cache = torch.randn(N, C, generator=g) * 2
    torch.manual_seed(1)
    s = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, C))
    return x, y, cache, s


def _train() -> tuple[dict[str, torch.Tensor], list[dict]]:
    torch.set_num_threads(1)
    x, y, cache, s = _setup()
    opt = torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.9)
    d = Distiller(s, opt, [(0.5, CrossEntropyTerm()), (0.5, KDTerm(2.0))], teacher=cache,
                  batch_size=GLOBAL_BATCH, seed=3, progress=False)
    hist = d.fit((x, y), EPOCHS)
    return {k: v.detach().clone().contiguous() for k, v in s.state_dict().items()}, hist


def _worker(rank: int, world: int, out: str) -> None:
    assert D.is_distributed() and D.rank() == rank and D.world_size() == world
    weights, hist = _train()
    if rank == 0:
        save_file(weights, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump(hist, f)


def test_shard_helpers():
    idx = torch.arange(10, 15)
    assert [D.shard_bounds(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]
    assert torch.equal(D.shard_batch(idx, 1, 2), torch.tensor([12, 13, 14]))
    # weights of unequal shards average to the global mean: (2 * w0 + 3 * w1) / 5 style
    assert D.shard_weight(5, 2, 2) == pytest.approx(0.8) and D.shard_weight(5, 3, 2) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="rank"):
        D.shard_bounds(5, 2, 2)
    assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0
    p = D.find_free_port()
    assert 0 < p < 65536


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    n = torch.get_num_threads()
    try:
        single_w, single_h = _train()
    finally:
        torch.set_num_threads(n)
    out = str(tmp_path / "ddp")
    D.spawn(_worker, 2, out, backend="gloo")
    ddp_w = load_file(out + ".safetensors")
    with open(out + ".json") as f:
        ddp_h = json.load(f)
    assert set(ddp_w) == set(single_w)
    for k in single_w:
        torch.testing.assert_close(ddp_w[k], single_w[k], rtol=1e-6, atol=1e-6)
    # the epoch metrics are reduced over ranks: same numbers as one process
    for a, b in zip(single_h, ddp_h):
        assert a["step"] == b["step"]
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # and the run really moved away from the initial weights
    _, _, _, s0 = _setup()
    assert not torch.allclose(s0[0].weight, single_w["0.weight"])
