"""The spiking CNN (kdengine.models.ConvSNN), its training-memory benchmark (kdengine.bench.snn_memory)
and the `kdengine repro snn_conv_fashion` entry (quick run: slow)."""
from __future__ import annotations

import json

import pytest
import torch

from kdengine.bench import snn_memory
from kdengine.models import ConvSNN


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    snn_memory.train_step(model, x, y)
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("T", [1, 3])
def test_conv_snn_memory_light_gradients_equal_plain(seed, T):
    model = ConvSNN(channels=(3, 5), hidden=7, time_steps=T)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    plain = _grads(model.set_memory_light(False), x, y)
    light = _grads(model.set_memory_light(True), x, y)
    assert all(torch.equal(a, b) for a, b in zip(plain, light))
    assert plain[0].abs().sum() > 0  # the first conv is reached through every spiking layer


def test_conv_snn_resets_its_neurons_between_inputs(seed):
    model = ConvSNN(channels=(3, 5), hidden=7, time_steps=2).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        a = model(x)
        model(torch.rand(5, 1, 28, 28))  # another batch size: a carried state would fail
        assert torch.equal(model(x), a)


def test_spikingjelly_arm_computes_the_same_forward(seed):
    factory = snn_memory.spikingjelly_if_factory()
    if factory is None:
        pytest.skip("spikingjelly is not installed (optional)")
    torch.manual_seed(3)
    ours = ConvSNN(channels=(3, 5), hidden=7, time_steps=3).eval()
    torch.manual_seed(3)
    sj = ConvSNN(factory, channels=(3, 5), hidden=7, time_steps=3).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(ours(x), sj(x))  # same IF with hard reset, spike for spike


def test_memory_bench_rows_and_notes(seed):
    rows = snn_memory.run_snn_memory_bench(steps=(1, 2), batch=4, repeat=1, with_rss=False, with_spikingjelly=False,
                                           channels=(4, 8), hidden=8)
    assert [r["impl"] for r in rows] == [snn_memory.LIGHT, snn_memory.PLAIN] * 2
    by = {(r["time_steps"], r["impl"]): r for r in rows}
    for T in (1, 2):
        light, plain = by[(T, snn_memory.LIGHT)], by[(T, snn_memory.PLAIN)]
        assert 0 < light["saved_MB"] < plain["saved_MB"] / 4
    # plain autograd keeps (T, B, ...) floats: more steps, more bytes
    assert by[(2, snn_memory.PLAIN)]["saved_MB"] > 1.5 * by[(1, snn_memory.PLAIN)]["saved_MB"]
    lines = snn_memory.notes(rows)
    assert len(lines) == 2 and all("memory-light" in line for line in lines)


@pytest.mark.slow
def test_memory_bench_peak_rss_child():
    peak = snn_memory.peak_rss_bytes("light", 2, 4, (4, 8), 16, threads=1)
    assert peak is not None and peak > 0


@pytest.mark.slow
def test_snn_conv_fashion_quick_run(tmp_path):
    from kdengine.repro import ReproArgs, registry

    entry = registry()["snn_conv_fashion"]
    out = entry.fn(ReproArgs(seeds=[0], quick=True, out_dir=tmp_path))
    payload = json.loads((tmp_path / "snn_conv_fashion.json").read_text())
    methods = [r["method"] for r in payload["rows"]]
    assert methods[:2] == ["kdengine IF", "kdengine IF, memory-light"]
    assert "kdengine PLIF" in methods and "kdengine PLIF, memory-light" in methods
    by = {r["method"]: r for r in payload["rows"]}
    assert payload["setup"]["memory_light_weights_equal_plain"] == {"0": {"IF": True, "PLIF": True}}
    for neuron in ("IF", "PLIF"):
        plain, light = by[f"kdengine {neuron}"], by[f"kdengine {neuron}, memory-light"]
        assert light["test_acc"] == plain["test_acc"]
        assert light["saved_MB"] < plain["saved_MB"] / 4
    assert all(r["epoch_s"] > 0 for r in payload["rows"])
    assert any("bit-identical" in n for n in payload["notes"])
    assert "md" in out["paths"] and "| kdengine IF |" in (tmp_path / "snn_conv_fashion.md").read_text()
