import json

import numpy as np
import pytest
import torch
from torch import nn

from kdengine.repro.snn_fashion import first_within, output_delay
from kdengine.snn import calibrate, convert


def _tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.AvgPool2d(2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 16, 12, bias=False), nn.ReLU(),
                         nn.Linear(12, 3, bias=False)).eval()


def test_lambdas_with_zeros_match_numpy_percentile():
    net = _tiny_net()
    x = torch.rand(40, 1, 8, 8) - 0.3
    cal = calibrate(net, x, batch_size=7)
    with torch.no_grad():
        h1 = net[:3](x)
        h2 = net[3:6](h1)
    want = [float(np.percentile(h.numpy().ravel(), 99.7)) for h in (h1, h2)]
    assert all((h == 0).any() for h in (h1, h2))  # the zeros are part of the ranking
    got = cal.lambdas_with_zeros(99.7)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # leaving the zeros out gives another (higher) scale: the two calibrations differ
    pos = [float(np.percentile(h[h > 0].numpy(), 99.7)) for h in (h1, h2)]
    assert all(p >= g for p, g in zip(pos, got))
    assert cal.n_values == [h1.numel(), h2.numel()]


def test_lambdas_with_zeros_all_zero_layer_warns():
    net = _tiny_net()
    with torch.no_grad():
        net[4].weight.fill_(-1.0)
    x = torch.rand(10, 1, 8, 8)
    cal = calibrate(net, x)
    with pytest.warns(UserWarning, match="lambda = 1"):
        lams = cal.lambdas_with_zeros(99.7)
    assert lams[1] == 1.0


def test_convert_with_given_lambdas_equals_percentile_conversion():
    net = _tiny_net()
    x = torch.rand(30, 1, 8, 8)
    cal = calibrate(net, x)
    a = convert(net, cal, 99.9)
    b = convert(net, cal, lambdas=cal.lambdas(99.9))
    assert a.info["lambdas"] == b.info["lambdas"]
    assert torch.equal(a(x, 5), b(x, 5))
    c = convert(net, cal, lambdas=[2.0, 3.0], threshold_scale=0.5)
    assert c.info["lambdas"] == [1.0, 1.5]
    with pytest.raises(ValueError, match="one value per hidden layer"):
        convert(net, cal, lambdas=[1.0])
    with pytest.raises(ValueError, match="> 0"):
        convert(net, cal, lambdas=[1.0, 0.0])


def test_first_within_and_output_delay():
    assert first_within([0.1, 0.9, 0.5, 0.95, 0.96], 0.9) == 4
    assert first_within([0.1, 0.2], 0.9) is None
    pot = torch.zeros(4, 3, 2)
    pot[1:, 0, 0] = 1.0
    pot[0, 1, 1] = -0.5
    assert output_delay(pot).tolist() == [2, 1, 5]


@pytest.mark.slow
def test_snn_fashion_quick_run(tmp_path):
    from kdengine.repro import ReproArgs, registry

    entry = registry()["snn_fashion"]
    out = entry.fn(ReproArgs(seeds=[0, 1], quick=True, out_dir=tmp_path))
    payload = json.loads((tmp_path / "snn_fashion.json").read_text())
    methods = {r["method"] for r in payload["rows"]}
    assert len(methods) == 3 and len(payload["rows"]) == 12
    assert any("REPRODUCED" in n for n in payload["notes"])
    assert payload["departures"] and payload["paired"]
    md = (tmp_path / "snn_fashion.md").read_text()
    assert "kdengine's additions" in md and "Departures from the paper" in md
    assert "md" in out["paths"]
