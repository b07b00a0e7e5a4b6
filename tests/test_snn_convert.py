"""ANN -> SNN conversion, running with early exit, latency tuning (kdengine.snn)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdengine.nn import binarize_model, pack_model
from kdengine.snn import (
    Calibration,
    EarlyExit,
    IFNeuron,
    SpikingBinaryConv2d,
    SpikingBinaryLinear,
    calibrate,
    convert,
    fold_batchnorm,
    run_snn,
    search_scaling,
    simulate_early_exit,
    tune_early_exit,
)

H = 12  # image side of the toy task
N_CLASSES = 4


def _toy_data(n: int, gen: torch.Generator):
    """Class k = a bright 4x4 blob in quadrant k, plus noise: easy, but the logits vary."""
    y = torch.randint(0, N_CLASSES, (n,), generator=gen)
    x = torch.rand(n, 1, H, H, generator=gen) * 0.3
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        dr, dc = torch.randint(0, 3, (2,), generator=gen).tolist()
        x[i, 0, r * 6 + dr:r * 6 + dr + 4, c * 6 + dc:c * 6 + dc + 4] += 0.7
    return x.clamp(0, 1), y


def _toy_cnn(pool: str = "avg") -> nn.Sequential:
    P = nn.AvgPool2d if pool == "avg" else nn.MaxPool2d
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), P(2), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), P(2), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(16 * 9, 32, bias=False), nn.ReLU(),
        nn.Linear(32, N_CLASSES, bias=False),
    )


def _train(model, x, y, steps=80, binary=False):
    from kdengine.nn import clip_latent_weights_

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for i in range(steps):
        idx = torch.arange(i * 32, i * 32 + 32) % len(x)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if binary:
            clip_latent_weights_(model)
    return model.eval()


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y = _toy_data(640, gen)
    xt, yt = _toy_data(160, gen)
    fmodel = _train(_toy_cnn("avg"), x, y)
    bmodel = _train(binarize_model(fmodel, mode="weights"), x, y, steps=40, binary=True)
    mmodel = _train(_toy_cnn("max"), x, y)
    return {"x": x, "y": y, "xt": xt, "yt": yt, "float": fmodel, "binary": bmodel, "max": mmodel}


def _agreement(model, snn, x, T):
    with torch.no_grad():
        logits = model(x)
    r = run_snn(snn, x, T, return_potentials=True)
    agree = float((r.predictions == logits.argmax(1)).double().mean())
    est = r.potentials[-1] / T  # the output layer is not normalised: potential / t ~ logits
    rel = float((est - logits).abs().mean() / logits.abs().mean())
    return agree, rel, r


# --------------------------------------------------------------------------- conversion quality


@pytest.mark.parametrize("kind", ["float", "binary", "max"])
def test_snn_rate_output_approaches_ann(toy, kind):
    model = toy[kind]
    snn = convert(model, toy["x"][:256], 99.9)
    agree, rel, _ = _agreement(model, snn, toy["xt"], 256)
    assert agree >= 0.95, agree
    assert rel < 0.03, rel  # potential / T estimates the logits (measured ~0.009)
    if kind == "binary":
        # the spike x binary-weight layers run on the packed kernel, not on float layers
        kinds = [type(m) for m in snn.layers]
        assert SpikingBinaryConv2d in kinds and SpikingBinaryLinear in kinds
        assert snn.notes == []
    # the ANN itself learnt the task, so agreement is not trivial
    with torch.no_grad():
        assert float((model(toy["xt"]).argmax(1) == toy["yt"]).double().mean()) > 0.9


def test_error_shrinks_with_T(toy):
    snn = convert(toy["float"], toy["x"][:256], 99.9)
    errs = []
    for T in (8, 64):
        _, rel, _ = _agreement(toy["float"], snn, toy["xt"][:64], T)
        errs.append(rel)
    assert errs[1] < errs[0]


def test_packed_binary_equals_float_path_and_packed_model(toy):
    """The packed spiking layers compute what float layers of +-alpha weights compute."""
    x = toy["xt"][:48]
    a = convert(toy["binary"], toy["x"][:256], binary="packed")
    b = convert(toy["binary"], toy["x"][:256], binary="float")
    ra, rb = run_snn(a, x, 64, return_potentials=True), run_snn(b, x, 64, return_potentials=True)
    # float rounding of the scale product may flip a spike sitting exactly at threshold: allow 1%
    assert float((ra.step_predictions == rb.step_predictions).double().mean()) >= 0.99
    torch.testing.assert_close(ra.potentials, rb.potentials, rtol=0.05, atol=0.05 * 64)
    # helper-5's packed inference model converts to the same network
    c = convert(pack_model(toy["binary"]), toy["x"][:256])
    assert c.info["lambdas"] == a.info["lambdas"]
    rc = run_snn(c, x, 64)
    assert torch.equal(rc.step_predictions, ra.step_predictions)


def test_threshold_balancing_matches_weight_normalisation(toy):
    a = convert(toy["float"], toy["x"][:256], normalize="weights")
    b = convert(toy["float"], toy["x"][:256], normalize="threshold")
    thr = [m.v_threshold for m in b.layers if isinstance(m, IFNeuron)]
    assert thr != [1.0] * len(thr)
    ra, rb = run_snn(a, toy["xt"][:64], 64), run_snn(b, toy["xt"][:64], 64)
    assert float((ra.step_predictions == rb.step_predictions).double().mean()) >= 0.99


def test_poisson_encoding_is_seeded(toy):
    x = toy["xt"][:64]
    a = convert(toy["float"], toy["x"][:256], encoding="poisson", seed=3)
    r1, r2 = run_snn(a, x, 32, return_potentials=True), run_snn(a, x, 32, return_potentials=True)
    assert torch.equal(r1.potentials, r2.potentials)
    b = convert(toy["float"], toy["x"][:256], encoding="poisson", seed=4)
    assert not torch.equal(run_snn(b, x, 32, return_potentials=True).potentials, r1.potentials)
    agree, _, _ = _agreement(toy["float"], a, x, 256)
    assert agree >= 0.9
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        run_snn(a, x * 3, 4)


def test_calibration_percentiles(toy):
    cal = calibrate(toy["float"], toy["x"][:128])
    assert isinstance(cal, Calibration) and cal.n_hidden == 3 and cal.n_samples == 128
    # lambda at 100 is the largest activation of the layer
    h = toy["x"][:128]
    with torch.no_grad():
        a1 = F.relu(F.avg_pool2d(toy["float"][0](h), 2))
    assert math.isclose(cal.lambdas(100.0)[0], float(a1.max()), rel_tol=1e-6)
    pos = a1[a1 > 0].flatten().sort().values
    r = math.ceil(0.9 * pos.numel())
    assert math.isclose(cal.lambdas(90.0)[0], float(pos[r - 1]), rel_tol=1e-6)
    l1, l2 = cal.lambdas(99.0), cal.lambdas(99.0, [0.5, 1.0, 2.0])
    assert l2 == pytest.approx([l1[0] * 0.5, l1[1], l1[2] * 2.0])
    # data as batches or an (x, y) pair gives the same statistics
    cal2 = calibrate(toy["float"], [(toy["x"][:64], None), (toy["x"][64:128], None)])
    cal3 = calibrate(toy["float"], (toy["x"][:128], toy["y"][:128]))
    assert cal2.lambdas(99.9) == cal.lambdas(99.9) == cal3.lambdas(99.9)


# --------------------------------------------------------------------------- BatchNorm folding


def _with_bn(binary: bool) -> nn.Sequential:
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.AvgPool2d(2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 9, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3),
    )
    for bn in m:
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.2, 3)
                bn.weight.uniform_(-2, 2)
                bn.bias.uniform_(-1, 1)
    with torch.no_grad():  # max pooling only commutes with positive BN scales
        m[9].weight.abs_()
    if binary:
        m = binarize_model(m, mode="weights")
    return m.eval()


@pytest.mark.parametrize("binary", [False, True])
def test_batchnorm_folding_is_exact(binary):
    m = _with_bn(binary)
    f = fold_batchnorm(m)
    assert not any(isinstance(l, (nn.BatchNorm1d, nn.BatchNorm2d)) for l in f)
    x = torch.rand(20, 1, 12, 12)
    with torch.no_grad():
        ref = m(x)
        got = f(x)
        ref64 = m.double()(x.double())
        got64 = fold_batchnorm(m)(x.double())  # folded in float64 from the float64 model
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got64, ref64, rtol=1e-10, atol=1e-10)  # exact up to rounding
    if binary:  # negative BN scales flipped sign bits: the folded layers are still +-alpha
        snn = convert(m.float(), x)
        assert any(isinstance(l, SpikingBinaryConv2d) for l in snn.layers)


def test_batchnorm_that_cannot_be_folded():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.BatchNorm2d(2), nn.ReLU(),
                      nn.Flatten(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        m[2].weight.copy_(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="negative scales"):
        fold_batchnorm(m)
    m2 = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2), nn.Flatten(),
                       nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ReLU"):
        fold_batchnorm(m2)
    with pytest.raises(ValueError, match="no preceding"):
        fold_batchnorm(nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 1, 1)))


# --------------------------------------------------------------------------- early exit


def test_early_exit_reports_steps_and_matches_offline(toy):
    snn = convert(toy["float"], toy["x"][:256], init_potential=0.5)
    x, y = toy["xt"], toy["yt"]
    T = 48
    full = run_snn(snn, x, T, labels=y, return_potentials=True)
    rule = EarlyExit(stable_steps=5, margin=2.0, min_steps=2)
    for chunk in (1, 4, 7):
        r = run_snn(snn, x, T, rule, labels=y, chunk=chunk, batch_size=50)
        assert r.steps_used.min() >= 1 and r.steps_used.max() <= T
        assert bool((r.steps_computed >= r.steps_used).all()) and r.steps_computed.max() <= T
        assert bool((r.steps_computed < r.steps_used + chunk).all())
        p, u = simulate_early_exit(full.potentials, rule)
        assert torch.equal(p, r.predictions) and torch.equal(u, r.steps_used)
    assert r.mean_steps < T
    # the accuracy trace freezes each decision after its exit
    assert float(r.accuracy_trace[-1]) == r.accuracy(y)
    # a rule that never fires changes nothing
    never = run_snn(snn, x, T, EarlyExit(margin=1e9), labels=y)
    assert torch.equal(never.predictions, full.predictions)
    assert bool((never.steps_used == T).all())


def test_tune_early_exit_respects_loss_budget(toy):
    snn = convert(toy["float"], toy["x"][:256], init_potential=0.5)
    r = run_snn(snn, toy["xt"], 40, labels=toy["yt"], return_potentials=True)
    rule, summ = tune_early_exit(r.potentials, toy["yt"], max_loss=0.01)
    assert rule is not None
    assert summ["accuracy"] >= summ["full_accuracy"] - 0.01 - 1e-12
    assert summ["mean_steps"] <= 40
    p, u = simulate_early_exit(r.potentials, rule)
    assert float(u.double().mean()) == summ["mean_steps"]
    # bounding the changed decisions is stricter: never fewer steps, flips within the bound
    rule2, summ2 = tune_early_exit(r.potentials, toy["yt"], max_loss=0.01, max_flip=0.0)
    assert rule2 is not None and summ2["flipped"] == 0.0
    assert summ2["mean_steps"] >= summ["mean_steps"]
    p2, _ = simulate_early_exit(r.potentials, rule2)
    assert torch.equal(p2, r.potentials[-1].argmax(-1))
    # a confidence limit on the changed fraction is stricter than the observed fraction
    rule3, summ3 = tune_early_exit(r.potentials, toy["yt"], max_loss=0.01, max_flip=0.05, flip_z=1.645)
    rule4, summ4 = tune_early_exit(r.potentials, toy["yt"], max_loss=0.01, max_flip=0.05)
    assert summ3["flipped_upper"] <= 0.05 and summ3["flipped_upper"] > summ3["flipped"]
    assert summ3["mean_steps"] >= summ4["mean_steps"]


def test_search_scaling_never_worse_than_baseline(toy):
    cal = calibrate(toy["float"], toy["x"][:256])
    res = search_scaling(cal, toy["x"][256:352], toy["y"][256:352], 8, percentiles=(99.9, 100.0),
                         scales=(0.8, 1.0), init_potentials=(0.0, 0.5), layer_factors=(0.8,))
    assert set(res.config) == {"percentile", "threshold_scale", "init_potential"}
    assert len(res.config["threshold_scale"]) == 3
    assert (res.score, res.mean_accuracy) >= (res.baseline["score"], res.baseline["mean_accuracy"])
    best = max(res.table, key=lambda r: (r["score"], r["mean_accuracy"]))
    assert (res.score, res.mean_accuracy) == (best["score"], best["mean_accuracy"])
    assert len(res.table) == 1 + 7 + 3  # baseline, the rest of the grid, one factor per layer
    convert(toy["float"], cal, **res.config)  # the config is valid convert() input


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_give_clear_errors(toy):
    m, x = toy["float"], toy["x"][:16]
    with pytest.raises(ValueError, match="calibration_data is required"):
        convert(m, None)
    with pytest.raises(ValueError, match="non-empty"):
        convert(m, torch.zeros(0, 1, H, H))
    with pytest.raises(ValueError, match="empty"):
        convert(m, [])
    for p in (0, -1, 100.5, float("nan")):
        with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
            convert(m, x, p)
    with pytest.raises(TypeError, match="percentile"):
        convert(m, x, "99")
    with pytest.raises(ValueError, match="one per hidden layer"):
        convert(m, x, [99.0, 99.0])
    with pytest.raises(ValueError, match="encoding"):
        convert(m, x, encoding="rate")
    with pytest.raises(ValueError, match="init_potential"):
        convert(m, x, init_potential=1.0)
    with pytest.raises(ValueError, match="unsupported layer '1' \\(Tanh\\)"):
        convert(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), torch.rand(4, 4))
    with pytest.raises(ValueError, match="nn.Sequential"):
        convert(nn.Linear(4, 2), torch.rand(4, 4))
    with pytest.raises(ValueError, match="end with a conv/linear"):
        convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.rand(4, 4))
    both = binarize_model(_toy_cnn(), mode="both")
    with pytest.raises(ValueError, match="mode='both'"):
        convert(both, x)
    with pytest.raises(TypeError, match="floating"):
        convert(m, x.to(torch.uint8))
    with pytest.raises(ValueError, match="stable_steps and/or margin"):
        EarlyExit()
    with pytest.raises(ValueError, match="margin"):
        EarlyExit(margin=-1.0)
    snn = convert(m, x)
    with pytest.raises(ValueError, match="T must be"):
        run_snn(snn, x, 0)
    with pytest.raises(TypeError, match="SpikingNetwork"):
        run_snn(m, x, 4)
    with pytest.raises(ValueError, match="return_potentials"):
        run_snn(snn, x, 4, EarlyExit(margin=1.0), return_potentials=True)
