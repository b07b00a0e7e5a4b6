"""IE-KD (docs/papers.md s6): factors, inheritance/exploration losses, channel splits, IE-DML."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdengine.methods.iekd import (
    IEDML,
    IEKD,
    ChannelSplit,
    FactorAutoEncoder,
    exploration_loss,
    factor_normalize,
    inheritance_loss,
    train_autoencoder,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation (7x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _direct_distance(a, b):
    """mean over samples and elements of |a_n/||a_n|| - b_n/||b_n|||, one sample at a time."""
    rows = []
    for n in range(a.shape[0]):
        x, y = a[n].reshape(-1), b[n].reshape(-1)
        rows.append((x / x.norm() - y / y.norm()).abs())
    return torch.stack(rows).mean()


def test_losses_against_direct_computation(seed):
    a = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    b = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    d = _direct_distance(a, b)
    torch.testing.assert_close(inheritance_loss(a, b), d)
    torch.testing.assert_close(exploration_loss(a, b), -d)
    n = factor_normalize(a)
    assert n.shape == (4, 75)
    torch.testing.assert_close(n.norm(dim=1), torch.ones(4, dtype=torch.float64))
    # scale invariance per sample, and the bound |L_exp| <= 2 / sqrt(D)
    torch.testing.assert_close(inheritance_loss(a * torch.rand(4, 1, 1, 1, dtype=torch.float64) * 5, b), d)
    assert inheritance_loss(a, a).item() == pytest.approx(0.0, abs=1e-12)
    # opposite factors: |n(a) - n(-a)| = 2 |n(a)|
    assert -exploration_loss(a, -a).item() == pytest.approx(2 * factor_normalize(a).abs().mean().item())
    assert -exploration_loss(a, b).item() <= 2 / 75 ** 0.5


def test_grids_are_pooled_to_the_coarser(seed):
    a = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    b = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(inheritance_loss(a, b), _direct_distance(F.avg_pool2d(a, 2), b))
    with pytest.raises(ValueError, match="factor size"):
        inheritance_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        inheritance_loss(torch.randn(2, 3), torch.randn(3, 3))


def test_iekd_forward_equals_parts_and_gradient_flow(seed):
    head = IEKD(student_channels=6, factor_channels=4, l_inh=3.0, l_exp=2.0).double()
    feat = torch.randn(5, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(5, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (5,))
    total, parts = head(logits, y, feat, f_t)
    f_inh = head.enc_inh(feat[:, :3])
    f_exp = head.enc_exp(feat[:, 3:])
    want = (F.cross_entropy(logits, y) + 3.0 * _direct_distance(f_inh, f_t)
            - 2.0 * _direct_distance(f_exp, f_t))
    torch.testing.assert_close(total, want)
    assert parts["inh"] == pytest.approx(_direct_distance(f_inh, f_t).item())
    assert parts["exp"] == pytest.approx(-_direct_distance(f_exp, f_t).item())
    total.backward()
    assert feat.grad[:, :3].abs().sum() > 0 and feat.grad[:, 3:].abs().sum() > 0
    assert f_t.grad is None  # the teacher factor is a target
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_exploration_step_moves_away_inheritance_step_moves_closer(seed):
    f_t = torch.randn(8, 16, dtype=torch.float64)
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    d0 = _direct_distance(x.detach(), f_t)
    (g_inh,) = torch.autograd.grad(inheritance_loss(x, f_t), x)
    (g_exp,) = torch.autograd.grad(exploration_loss(x, f_t), x)
    assert _direct_distance(x.detach() - 0.5 * g_inh, f_t) < d0
    assert _direct_distance(x.detach() - 0.5 * g_exp, f_t) > d0


def test_channel_split_variants():
    f = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    nat = ChannelSplit(7, "natural")
    a, b = nat(f)
    assert torch.equal(a, f[:, :3]) and torch.equal(b, f[:, 3:]) and nat.sizes == (3, 4)
    r1, r1b = ChannelSplit(7, "random", seed=1), ChannelSplit(7, "random", seed=1)
    r2 = ChannelSplit(7, "random", seed=2)
    assert torch.equal(r1.inh_index, r1b.inh_index)
    assert not (torch.equal(r1.inh_index, r2.inh_index) and torch.equal(r1.exp_index, r2.exp_index))
    assert torch.equal(torch.cat([r1.inh_index, r1.exp_index]).sort().values, torch.arange(7))
    a, b = r1(f)
    assert torch.equal(a, f[:, r1.inh_index]) and torch.equal(b, f[:, r1.exp_index])
    assert "inh_index" in r1.state_dict()
    head = IEKD(8, 4, split="random", seed=5)
    assert head.split.mode == "random"
    out, _ = head(torch.randn(3, 10), torch.randint(0, 10, (3,)), torch.randn(3, 8, 4, 4),
                  torch.randn(3, 4, 4, 4))
    assert torch.isfinite(out)


def test_vector_features():
    ae = FactorAutoEncoder(12, 4, spatial=False)
    f = torch.randn(6, 12)
    rec, z = ae(f)
    assert rec.shape == f.shape and z.shape == (6, 4)
    head = IEKD(10, 4, spatial=False)
    total, _ = head(torch.randn(6, 3), torch.randint(0, 3, (6,)), torch.randn(6, 10), z)
    assert torch.isfinite(total)


def test_autoencoder_learns_to_reconstruct():
    torch.manual_seed(0)
    basis = torch.randn(4, 8)
    batches = [(torch.randn(32, 4) @ basis)[:, :, None, None].expand(32, 8, 3, 3).contiguous()
               for _ in range(8)]
    ae = FactorAutoEncoder(8, 4)
    hist = train_autoencoder(ae, batches, epochs=15, lr=1e-2)
    assert hist[-1] < 0.3 * hist[0], hist
    assert not ae.training
    assert ae.encode(batches[0]).shape == (32, 4, 3, 3)


def _net(width, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))


def test_iedml_step_changes_both_nets():
    a, b = _net(4, 0), _net(6, 1)
    a0 = [p.detach().clone() for p in a.parameters()]
    b0 = [p.detach().clone() for p in b.parameters()]
    dml = IEDML(a, b, "5", "5", 4, 6, torch.optim.SGD(a.parameters(), lr=0.1),
                torch.optim.SGD(b.parameters(), lr=0.1), factor_channels=3, split="random")
    enc0 = [p.detach().clone() for p in dml.heads[0].parameters()]
    ae0 = [p.detach().clone() for p in dml.aes[1].parameters()]
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    out = dml.step(x, y)
    assert set(out) == {"loss_a", "loss_b", "rec_a", "rec_b"}
    assert all(v == v and abs(v) < 1e6 for v in out.values())
    for now, before in ((a.parameters(), a0), (b.parameters(), b0),
                        (dml.heads[0].parameters(), enc0), (dml.aes[1].parameters(), ae0)):
        assert any(not torch.equal(p.detach(), q) for p, q in zip(now, before))
    dml.remove()
    assert not a[5]._forward_hooks


def test_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        ChannelSplit(4, "weird")
    with pytest.raises(ValueError, match="channels"):
        ChannelSplit(1)
    with pytest.raises(ValueError, match="channels"):
        IEKD(0, 4)
    with pytest.raises(ValueError, match=r"\(N, 4"):
        ChannelSplit(4)(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="C=8"):
        FactorAutoEncoder(8, 2).encode(torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match="floating"):
        factor_normalize(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="l_inh"):
        IEKD(4, 2, l_inh=-1.0)
    with pytest.raises(ValueError, match="epochs"):
        train_autoencoder(FactorAutoEncoder(2, 1), [torch.randn(2, 2, 1, 1)], epochs=0)
    nan = torch.randn(2, 3)
    nan[0, 0] = float("nan")
    assert torch.isnan(inheritance_loss(nan, torch.randn(2, 3)))


def _mean_pairwise_cosine(f):
    n = factor_normalize(f)
    c = n @ n.T
    k = c.shape[0]
    return float((c.sum() - c.diagonal().sum()) / (k * k - k))


def test_iedml_factor_uses_the_batch_statistics_of_the_reconstruction_step():
    """The factor a peer inherits is the auto-encoder's code in its training pass (batch
    statistics, weights before the step), not an eval-mode encode whose BatchNorm running statistics
    (mean 0, var 1 at the start) lag behind the features; with features of small variance, as a
    ReLU CNN's at initialisation, that code is nearly one unit vector for every image."""
    import copy

    from kdengine.models import small_cnn

    torch.manual_seed(2)
    a, b = small_cnn(channels=(4, 8), hidden=32), small_cnn(channels=(4, 8), hidden=32)
    pair = IEDML(a, b, "5", "5", 8, 8, torch.optim.Adam(a.parameters(), lr=1e-2),
                 torch.optim.Adam(b.parameters(), lr=1e-2), factor_channels=8)
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        feat = b[:6](x)
    assert feat.var() < 0.1   # far from the running variance a fresh BatchNorm starts with
    ae0 = copy.deepcopy(pair.aes[1]).train()
    logits, factor, rec = pair._source(1, x)
    with torch.no_grad():
        want_rec, want = ae0(feat)
    torch.testing.assert_close(factor, want)
    assert rec == pytest.approx(F.mse_loss(want_rec, feat).item(), rel=1e-5)
    assert not factor.requires_grad
    assert any(not torch.equal(p, q) for p, q in zip(pair.aes[1].parameters(), ae0.parameters()))
    # the eval-mode factor is nearly input-independent; the one handed over is not
    with torch.no_grad():
        stale = copy.deepcopy(pair.aes[1]).eval().encode(feat)
    assert _mean_pairwise_cosine(stale) > 0.95
    assert _mean_pairwise_cosine(factor) < 0.9
    pair.remove()


@pytest.mark.slow
def test_iedml_peers_both_learn_on_the_seed_that_collapsed():
    """MNIST seed 2 of the former `kdengine repro iekd`: peer A ended at chance (10.7 %) because it
    inherited near-constant factors and its features died; after 60 steps it was at 11 %."""
    from kdengine.models import small_cnn
    from kdengine.repro.common import mnist_split
    from kdengine.train import evaluate
    from kdengine.train.distiller import global_batches

    (xtr, ytr), test = mnist_split(0)
    seed = 2
    torch.manual_seed(2000 + seed)
    a, b = small_cnn(channels=(4, 8), hidden=32), small_cnn(channels=(4, 8), hidden=32)
    pair = IEDML(a, b, "5", "5", 8, 8, torch.optim.Adam(a.parameters(), lr=1e-2),
                 torch.optim.Adam(b.parameters(), lr=1e-2), factor_channels=8, l_inh=50.0,
                 l_exp=10.0, seed=seed, dml_weight=1.0, ae_lr=2e-3)
    for t, idx in enumerate(global_batches(xtr.shape[0], 128, seed, 0)):
        if t == 60:
            break
        pair.step(xtr[idx], ytr[idx])
    pair.remove()
    with torch.no_grad():
        live = [(net[:8](test[0][:500]) > 0).float().mean().item() for net in (a, b)]
    accs = [evaluate(net, test) for net in (a, b)]
    assert min(live) > 0.1, live      # hidden ReLUs still active in both peers
    assert min(accs) > 0.6, accs


@pytest.mark.slow
def test_repro_quick_entry(tmp_path):
    import json

    from kdengine import repro

    assert repro.main(["iekd", "--quick", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "iekd.json").read_text())
    methods = {(r["direction"], r["method"]) for r in res["rows"]}
    assert methods == {("L->S", m) for m in ("alone", "kd", "iekd", "iekd no-exp", "dml", "ie-dml")} | {
        ("S->L", m) for m in ("alone", "kd", "iekd", "iekd no-exp")}
    for r in res["rows"]:
        assert r["test_acc"] > 0.3, r
        if r["method"] in ("dml", "ie-dml"):
            assert min(r["test_acc_a"], r["test_acc_b"]) > 0.3, r
    assert res["paired"] and res["tuning"] and res["departures"]
    assert sum(n.startswith("claim: ") for n in res["notes"]) == 7
    assert "Paired by seed against alone" in res["extra_md"] and "against dml" in res["extra_md"]
