"""LONDON (docs/papers.md s4): transmitting matrices, a spectral norm that carries a gradient, the loss."""
import math

import pytest
import torch
from torch import nn

from kdengine.methods.london import (
    FeatureHooks,
    LondonLoss,
    build_connector,
    default_pair_weights,
    gaussian_margin,
    geometric_layer_weights,
    geometric_pair_weights,
    lipschitz_profile,
    london_alpha,
    london_loss,
    margin_from_bn,
    margin_from_features,
    ofd_distillation_loss,
    ofd_london_losses,
    spectral_norm,
    transmitting_matrix,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation (7x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gapped(n, r, k, s1=3.0, dtype=torch.float64):
    """Random (n, r, k) matrices with singular values s1 > 1 >= ... (a clear spectral gap)."""
    q1, _ = torch.linalg.qr(torch.randn(n, r, r, dtype=dtype))
    q2, _ = torch.linalg.qr(torch.randn(n, k, k, dtype=dtype))
    m = min(r, k)
    s = torch.rand(n, m, dtype=dtype) * 0.9 + 0.1
    s[:, 0] = s1
    return q1[:, :, :m] @ torch.diag_embed(s) @ q2[:, :, :m].transpose(1, 2)


def test_sigma_matches_svd(seed):
    m = _gapped(5, 7, 11)
    sig = spectral_norm(m, n_iter=15)
    ref = torch.linalg.svdvals(m)[:, 0]
    torch.testing.assert_close(sig, ref, rtol=1e-9, atol=0)


def test_sigma_matches_svd_on_relu_features_default_iters(seed):
    a = torch.relu(torch.randn(6, 16, 8, 8))
    b = torch.relu(torch.randn(6, 32, 4, 4))
    tm = transmitting_matrix(a, b)
    ref = torch.linalg.svdvals(tm.double())[:, 0]
    torch.testing.assert_close(spectral_norm(tm).double(), ref, rtol=1e-4, atol=0)


def test_sigma_gradient_equals_svd_gradient(seed):
    m = _gapped(3, 6, 5).requires_grad_(True)
    w = torch.randn(3, dtype=torch.float64)
    (g,) = torch.autograd.grad((spectral_norm(m, n_iter=30) * w).sum(), m)
    m2 = m.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((torch.linalg.svdvals(m2)[:, 0] * w).sum(), m2)
    assert g.abs().max() > 0.1
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)


def test_single_matrix_and_vectors(seed):
    m = _gapped(1, 4, 6)[0]
    sig, (u, v) = spectral_norm(m, n_iter=20, return_vectors=True)
    assert sig.dim() == 0 and u.shape == (4,) and v.shape == (6,)
    torch.testing.assert_close(m @ v, sig * u, rtol=1e-8, atol=1e-10)


def test_transmitting_matrix_against_direct_loop(seed):
    n, ci, co = 3, 5, 7
    a = torch.randn(n, ci, 8, 6, dtype=torch.float64)
    b = torch.randn(n, co, 4, 3, dtype=torch.float64)
    tm = transmitting_matrix(a, b)
    assert tm.shape == (n, ci, co)
    for s in range(n):
        pooled = a[s].reshape(ci, 4, 2, 3, 2).mean(dim=(2, 4)).reshape(ci, 12)  # 2x2 block means
        direct = pooled @ b[s].reshape(co, 12).T / 12.0
        torch.testing.assert_close(tm[s], direct)


def test_transmitting_matrix_vectors_and_same_grid(seed):
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(transmitting_matrix(a, b), a[:, :, None] * b[:, None, :])
    # rank one: sigma = |a| |b|
    torch.testing.assert_close(spectral_norm(transmitting_matrix(a, b), n_iter=3),
                               a.norm(dim=1) * b.norm(dim=1))
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(transmitting_matrix(x, y),
                               x.flatten(2) @ y.flatten(2).transpose(1, 2) / 16.0)


def test_half_inputs_use_fp32_math():
    a = torch.rand(2, 4, 4, 4).to(torch.bfloat16)
    b = torch.rand(2, 4, 2, 2).to(torch.bfloat16)
    assert transmitting_matrix(a, b).dtype == torch.float32


def _cnn(widths, seed):
    torch.manual_seed(seed)
    layers, c = [], 1
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def test_loss_gradient_reaches_student_parameters(seed):
    student = _cnn([4, 6, 8], seed)
    teacher = _cnn([8, 12, 16], seed + 1)
    x = torch.randn(5, 1, 16, 16)
    s_names, t_names = ["1", "4", "7"], ["1", "4", "7"]   # the ReLU outputs of each stage
    with LondonLoss(student, teacher, s_names, t_names) as crit:
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = crit()
    assert loss.item() > 0
    loss.backward()
    for name in ("0.weight", "3.weight", "6.weight"):
        g = dict(student.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    # a hook removed on exit: no more captures
    assert not student[1]._forward_hooks


def test_loss_equals_direct_computation_and_gradcheck(seed):
    s = [torch.randn(3, c, h, h, dtype=torch.float64).abs().requires_grad_(True)
         for c, h in ((3, 8), (4, 4), (5, 2))]
    t = [torch.randn(3, c, h, h, dtype=torch.float64).abs() for c, h in ((6, 8), (7, 4), (2, 2))]
    w = default_pair_weights(2)
    assert w == pytest.approx([1 / 3, 2 / 3])
    loss = london_loss(s, t, n_iter=50)
    def sv(fs):
        return torch.stack([torch.linalg.svdvals(transmitting_matrix(a, b))[:, 0]
                                     for a, b in zip(fs[:-1], fs[1:])], 1)
    direct = sum(w[i] * ((sv(s)[:, i] - sv(t)[:, i]) ** 2).mean() for i in range(2))
    torch.testing.assert_close(loss, direct, rtol=1e-9, atol=1e-12)
    # gradcheck on small maps (each input element costs two loss evaluations)
    s = [torch.randn(2, c, h, h, dtype=torch.float64).abs().requires_grad_(True)
         for c, h in ((2, 4), (3, 2), (2, 1))]
    t = [torch.randn(2, c, h, h, dtype=torch.float64).abs() for c, h in ((3, 4), (2, 2), (4, 1))]
    assert torch.autograd.gradcheck(lambda *f: london_loss(list(f), t, [0.3, 0.7], n_iter=50),
                                    tuple(s), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_profile_shape_and_weights():
    feats = [torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4, 4), torch.rand(2, 5, 2, 2), torch.rand(2, 6)]
    assert lipschitz_profile(feats).shape == (2, 3)
    w = default_pair_weights(4)
    assert math.isclose(sum(w), 1.0) and all(a < b for a, b in zip(w, w[1:]))


def test_nan_in_nan_out():
    a = torch.rand(2, 3, 4, 4)
    a[0, 0, 0, 0] = float("nan")
    sig = spectral_norm(transmitting_matrix(a, torch.rand(2, 3, 2, 2)))
    assert torch.isnan(sig[0]) and torch.isfinite(sig[1])


def test_zero_features_give_zero_not_nan():
    z = torch.zeros(2, 3, 4, 4)
    assert torch.equal(spectral_norm(transmitting_matrix(z, z)), torch.zeros(2))


def test_feature_hooks_order_and_errors():
    net = _cnn([2, 3], 0)
    with FeatureHooks(net, ["4", "1"]) as h:
        with pytest.raises(RuntimeError, match="forward"):
            _ = h.features
        net(torch.randn(1, 1, 8, 8))
        f = h.features
        assert f[0].shape == (1, 3, 4, 4) and f[1].shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="nope"):
        FeatureHooks(net, ["nope"])
    with pytest.raises(TypeError):
        FeatureHooks(net, "1")
    with pytest.raises(ValueError):
        FeatureHooks(net, [])


def test_bad_inputs():
    with pytest.raises(ValueError, match="smaller"):
        transmitting_matrix(torch.rand(1, 2, 2, 2), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="batch"):
        transmitting_matrix(torch.rand(1, 2, 4, 4), torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        transmitting_matrix(torch.rand(1, 2, 4), torch.rand(1, 2, 4))
    with pytest.raises(TypeError, match="floating"):
        transmitting_matrix(torch.ones(1, 2, 4, 4, dtype=torch.int64), torch.rand(1, 2, 4, 4))
    with pytest.raises(TypeError):
        transmitting_matrix([1.0], torch.rand(1, 2))
    with pytest.raises(ValueError, match="n_iter"):
        spectral_norm(torch.rand(1, 2, 2), n_iter=0)
    with pytest.raises(ValueError, match="tm"):
        spectral_norm(torch.rand(2))
    feats = [torch.rand(2, 3, 4, 4), torch.rand(2, 3, 2, 2)]
    with pytest.raises(ValueError, match="same number"):
        london_loss(feats, feats[:1])
    with pytest.raises(ValueError, match="at least 2"):
        london_loss(feats[:1], feats[:1])
    with pytest.raises(ValueError, match="one entry per"):
        london_loss(feats, feats, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="non-negative"):
        london_loss(feats, feats, weights=[-1.0])
    with pytest.raises(ValueError, match="batch"):
        london_loss(feats, [torch.rand(3, 3, 4, 4), torch.rand(3, 3, 2, 2)])
    net = _cnn([2, 3], 0)
    with pytest.raises(ValueError, match="same length"):
        LondonLoss(net, net, ["1", "4"], ["1"])


# --------------------------------------------------------------------------- OFD stack


@pytest.mark.parametrize("spatial", [True, False])
def test_connector_maps_student_width_to_teacher_width(spatial):
    torch.manual_seed(0)
    c = build_connector(4, 16, spatial=spatial)
    x = torch.randn(8, 4, 7, 7) if spatial else torch.randn(8, 4)
    y = c(x)
    assert y.shape == ((8, 16, 7, 7) if spatial else (8, 16))
    assert sum(p.numel() for p in c[0].parameters()) == 4 * 16   # no bias: BN supplies the shift


def test_gaussian_margin_is_the_negative_part_mean():
    torch.manual_seed(0)
    mean, std = torch.tensor([-1.0, 0.0, 0.7]), torch.tensor([1.0, 2.0, 0.5])
    x = mean[:, None] + std[:, None] * torch.randn(3, 400_000, dtype=torch.float64)
    mc = torch.stack([r[r < 0].mean() for r in x])
    assert torch.allclose(gaussian_margin(mean, std), mc, atol=0.01)
    # a channel that is almost never negative falls back to -3 std
    assert gaussian_margin(torch.tensor([10.0]), torch.tensor([1.0])).item() == pytest.approx(-3.0)
    bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.bias.copy_(mean)
        bn.weight.copy_(-std)   # the sign of gamma does not change the spread
    assert torch.allclose(margin_from_bn(bn).double(), gaussian_margin(mean, std), atol=1e-6)
    f = mean[None, :, None, None] + std[None, :, None, None] * torch.randn(200, 3, 20, 25)
    assert torch.allclose(margin_from_features(f).double(), mc, atol=0.03)


def test_ofd_loss_against_direct_loop():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.randn(2, 3, 2, 2, dtype=torch.float64)
    m = torch.tensor([-0.5, -1.0, -0.2], dtype=torch.float64)
    want = 0.0
    for idx in torch.cartesian_prod(*[torch.arange(k) for k in s.shape]).tolist():
        n, c, h, w = idx
        tt = max(t[n, c, h, w].item(), m[c].item())
        sv = s[n, c, h, w].item()
        if sv > tt or tt > 0:
            want += (sv - tt) ** 2
    assert ofd_distillation_loss(s, t, m).item() == pytest.approx(want, rel=1e-12)
    # student below a negative target: no loss, whatever the teacher's exact value
    assert ofd_distillation_loss(torch.full((1, 1), -5.0), torch.full((1, 1), -1.0), torch.tensor([-2.0])) == 0
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ofd_distillation_loss(a, t, m), (s,))
    with pytest.raises(ValueError):
        ofd_distillation_loss(s, t[:1], m)
    with pytest.raises(ValueError):
        ofd_distillation_loss(s, t, m[:2])


def test_weights_and_alpha_schedule():
    assert geometric_layer_weights(3) == [0.25, 0.5, 1.0]
    assert geometric_pair_weights(2) == [0.25, 0.5]
    assert [london_alpha(e, 10, 0.8) for e in (0, 5, 6, 9)] == [0.8, 0.8, pytest.approx(0.2), pytest.approx(0.2)]
    for bad in (lambda: geometric_layer_weights(0), lambda: geometric_pair_weights(0), lambda: london_alpha(0, 0, 1)):
        with pytest.raises(ValueError):
            bad()


def test_ofd_london_losses_train_student_and_connectors():
    torch.manual_seed(2)
    s = [torch.randn(4, 2, 8, 8, dtype=torch.float64, requires_grad=True),
         torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True),
         torch.randn(4, 5, dtype=torch.float64, requires_grad=True)]
    t = [torch.randn(4, 6, 8, 8, dtype=torch.float64), torch.randn(4, 7, 4, 4, dtype=torch.float64),
         torch.randn(4, 9, dtype=torch.float64)]
    conns = [build_connector(2, 6).double(), build_connector(3, 7).double(), build_connector(5, 9, False).double()]
    margins = [margin_from_features(f).double() for f in t]
    distill, lip = ofd_london_losses(s, t, conns, margins)
    out = [c(f) for c, f in zip(conns, s)]
    want_d = sum(w * ofd_distillation_loss(a, b, m) for w, a, b, m in zip([0.25, 0.5, 1.0], out, t, margins)) / 4
    assert distill.item() == pytest.approx(want_d.item(), rel=1e-10)
    assert lip.item() == pytest.approx(london_loss(out, t, [0.25, 0.5]).item(), rel=1e-10)
    (distill + lip).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s)
    assert all(p.grad is not None for c in conns for p in c.parameters())
    with pytest.raises(ValueError):
        ofd_london_losses(s[:1], t[:1], conns[:1], margins[:1])


@pytest.mark.slow
def test_repro_quick_runs(tmp_path):
    from kdengine import repro

    assert repro.main(["london", "--quick", "--out", str(tmp_path)]) == 0
    import json

    res = json.loads((tmp_path / "london.json").read_text())
    methods = {r["method"] for r in res["rows"]}
    assert {"CE (student alone)", "KD (vanilla)", "OFD (feature distillation)", "OFD + LONDON"} <= methods
    assert res["tuning"] and res["departures"]
