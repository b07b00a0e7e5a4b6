"""Tang et al. (docs/papers.md section 2): the target variants, the rescaling weight vs autograd, and the
grouped Gaussian-mixture generator."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdengine import kd_loss
from kdengine.data.synthetic import class_groups, gaussian_mixture
from kdengine.methods import tang
from kdengine.train import BatchContext, Distiller


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(n=9, c=6, scale=2.0):
    z = torch.randn(n, c) * scale
    v = torch.randn(n, c) * scale
    y = torch.randint(0, c, (n,))
    return z, v, y


def test_targets_are_distributions_with_the_right_structure(seed):
    z, v, y = _batch()
    n, c = v.shape
    w = torch.randn(c, 5)
    sim = tang.class_similarity_distribution(w, tau=0.2)
    ts = {
        "ls": tang.label_smoothing_targets(y, c, 0.2),
        "kd": tang.kd_targets(v, 2.0),
        "pt": tang.partial_teacher_targets(v, y, 2.0),
        "sim": tang.class_similarity_targets(y, sim),
        "pt+sim": tang.combined_targets(v, y, sim, 2.0),
    }
    for name, t in ts.items():
        assert t.shape == (n, c), name
        assert (t >= 0).all(), name
        torch.testing.assert_close(t.sum(-1), torch.ones(n), msg=name)
    rows = torch.arange(n)
    p = torch.softmax(v / 2.0, -1)
    # label smoothing: 1 - eps + eps/C on the true class
    torch.testing.assert_close(ts["ls"][rows, y], torch.full((n,), 0.8 + 0.2 / c))
    # partial teacher keeps p_c and is uniform elsewhere
    torch.testing.assert_close(ts["pt"][rows, y], p[rows, y])
    off = ts["pt"].masked_select(torch.nn.functional.one_hot(y, c) == 0).view(n, c - 1)
    torch.testing.assert_close(off, ((1 - p[rows, y]) / (c - 1))[:, None].expand(n, c - 1))
    # class-similarity: depends on the class only; true class has the largest mass
    for i in range(n):
        torch.testing.assert_close(ts["sim"][i], sim[y[i]])
    assert (ts["sim"].argmax(-1) == y).all()
    # combined: p_c on the true class, rest in proportion to the similarity row
    torch.testing.assert_close(ts["pt+sim"][rows, y], p[rows, y])
    i = 0
    others = [j for j in range(c) if j != int(y[i])]
    ratio = ts["pt+sim"][i, others] / sim[y[i], others]
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))


def test_class_similarity_is_cosine_of_weight_rows():
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    s = tang.class_similarity(w)
    torch.testing.assert_close(s, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    d = tang.class_similarity_distribution(w, tau=0.5)
    assert d[0, 1] == d[0, 0] and d[0, 2] < d[0, 1]


@pytest.mark.parametrize("variant", ["kd", "pt", "ls", "sim", "pt+sim"])
def test_rescaling_weight_matches_autograd(variant, seed):
    z, v, y = _batch(n=16, c=7)
    c = z.shape[1]
    sim = tang.class_similarity_distribution(torch.randn(c, 4), tau=0.3)
    fn = tang.make_targets_fn(variant, num_classes=c, eps=0.15, temperature=1.0, sim_dist=sim)
    ctx = BatchContext(inputs=None, labels=y, indices=torch.arange(16), student_logits=z, teacher_logits=v)
    t = fn(ctx).double()
    t = t / t.sum(-1, keepdim=True)   # the identity needs sum(t) = 1; float32 rows are 1 +- 1e-7
    for a in (0.0, 0.3, 0.9):
        w_formula = tang.rescaling_weight_from_logits(z, t, y, a)
        w_auto = tang.true_class_gradient_ratio(z, t, y, a)
        torch.testing.assert_close(w_formula, w_auto, rtol=1e-9, atol=1e-9)
    # KD and the partial teacher share p_c, hence the same instance-level weights
    if variant == "pt":
        tk = tang.kd_targets(v, 1.0)
        torch.testing.assert_close(tang.rescaling_weight_from_logits(z, t, y, 0.5),
                                   tang.rescaling_weight_from_logits(z, tk, y, 0.5))


def test_rescaling_weight_orders_examples_by_teacher_confidence():
    qc = torch.full((3,), 0.3, dtype=torch.float64)
    pc = torch.tensor([0.99, 0.5, 0.05], dtype=torch.float64)
    w = tang.rescaling_weight(pc, qc, 0.5)
    assert w[0] > w[1] > w[2] and abs(float(w[0]) - 1) < 0.01
    torch.testing.assert_close(w, 1 - 0.5 * (1 - pc) / 0.7)
    assert math.isnan(float(tang.rescaling_weight(torch.tensor([0.5]), torch.tensor([1.0]), 0.5)[0]))


def test_distillation_loss_with_kd_targets_is_hinton_kd_plus_constant(seed):
    z, v, y = _batch()
    zz = z.clone().requires_grad_(True)
    t = tang.kd_targets(v, 3.0)
    l1 = tang.distillation_loss(zz, t, y, 0.4, temperature=3.0)
    l2 = kd_loss(zz, v, 3.0, labels=y, hard_weight=0.6)
    g1, = torch.autograd.grad(l1, zz)
    g2, = torch.autograd.grad(l2, zz)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    # they differ by a * T^2 * H(p), which does not depend on z
    ent = -(t * t.log()).sum(-1).mean()
    torch.testing.assert_close(l1 - l2, 0.4 * 9.0 * ent, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    z, v, y = _batch()
    with pytest.raises(ValueError, match="alpha"):
        tang.distillation_loss(z, torch.softmax(v, -1), y, 1.5)
    with pytest.raises(ValueError, match="labels"):
        tang.partial_teacher_targets(v, y + 100)
    with pytest.raises(ValueError, match="sim_dist"):
        tang.make_targets_fn("sim", num_classes=6)
    with pytest.raises(ValueError, match="variant"):
        tang.make_targets_fn("nope", num_classes=6)
    with pytest.raises(ValueError, match="tau"):
        tang.class_similarity_distribution(torch.randn(4, 3), tau=0.0)


def test_variants_train_with_the_distiller():
    data = gaussian_mixture(n_classes=6, n_groups=2, dim=8, n_train_per_class=20, n_test_per_class=20,
                            class_scale=1.0, seed=1)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 6))
    sim = tang.class_similarity_distribution(tang.logit_layer(teacher).weight, tau=0.2)
    for variant in tang.VARIANTS:
        torch.manual_seed(1)
        s = nn.Sequential(nn.Linear(8, 6))
        terms = tang.make_terms(variant, alpha=0.5, num_classes=6, temperature=2.0, sim_dist=sim)
        d = Distiller(s, torch.optim.SGD(s.parameters(), lr=0.05), terms, teacher=teacher,
                      batch_size=40, progress=False)
        h = d.fit(data.train, 2, test=data.test)
        assert math.isfinite(h[-1]["loss"]) and 0.0 <= h[-1]["test_acc"] <= 1.0
        if variant != "ce":
            # only teacher-logit targets are matched at T; ls and sim at T = 1
            assert terms[1][1].temperature == (2.0 if variant in ("kd", "pt", "pt+sim") else 1.0)


def test_gaussian_mixture_is_seeded_and_grouped():
    a = gaussian_mixture(n_classes=12, n_groups=3, dim=16, n_train_per_class=30, n_test_per_class=40, seed=3)
    b = gaussian_mixture(n_classes=12, n_groups=3, dim=16, n_train_per_class=30, n_test_per_class=40, seed=3)
    c = gaussian_mixture(n_classes=12, n_groups=3, dim=16, n_train_per_class=30, n_test_per_class=40, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.shape == (360, 16) and a.x_test.shape == (480, 16)
    assert torch.bincount(a.y_train).tolist() == [30] * 12
    assert class_groups(12, 3).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # class centres of one group are closer to each other than to other groups' centres
    d = torch.cdist(a.centres, a.centres)
    same = a.groups[:, None] == a.groups[None, :]
    off = ~torch.eye(12, dtype=torch.bool)
    assert d[same & off].mean() < 0.5 * d[~same].mean()
    # the Bayes classifier confuses classes within groups, almost never across groups
    pred = a.bayes_logits(a.x_test).argmax(-1)
    assert (a.groups[pred] == a.groups[a.y_test]).float().mean() > 0.99
    with pytest.raises(ValueError, match="n_groups"):
        gaussian_mixture(n_classes=4, n_groups=5)
    with pytest.raises(ValueError, match="noise_scale"):
        gaussian_mixture(noise_scale=0.0)


def test_confusable_scores_count_within_group_mixups():
    from kdengine.repro.tang import confusable_scores

    # classes 0 T-shirt, 2 Pullover, 4 Coat, 6 Shirt, two test images each, plus a Trouser (1)
    y = torch.tensor([0, 0, 2, 2, 4, 4, 6, 6, 1])
    pred = torch.tensor([0, 6, 2, 2, 4, 1, 0, 6, 1])
    s = confusable_scores(pred, y)
    assert s["acc T-shirt/top"] == 0.5 and s["acc Pullover"] == 1.0 and s["acc Coat"] == 0.5
    assert s["acc Shirt"] == 0.5
    assert s["group_acc"] == 5 / 8
    # the coat predicted as trouser left the group: only the two shirt <-> T-shirt swaps count
    assert s["within_group_confusion"] == 2 / 8


def test_claims_are_decided_by_the_paired_interval():
    from kdengine.repro.tang import FASHION, VARIANT_LABELS, _claims

    gain = {"ce": 0.0, "ls": 0.002, "kd": 0.02, "pt": 0.018, "sim": -0.01, "pt+sim": 0.019}
    noise = [0.001, -0.002, 0.0, 0.002, -0.001]
    rows, group_rows = [], []
    for k, (v, g) in enumerate(gain.items()):
        for s in range(5):
            e = noise[(s + k) % 5]
            rows.append({"dataset": FASHION, "method": VARIANT_LABELS[v], "seed": s, "test_acc": 0.8 + g + e})
            group_rows.append({"dataset": FASHION, "method": VARIANT_LABELS[v], "seed": s,
                               "group_acc": 0.7 + g + (e if v != "ls" else -e)})
    lines = _claims(rows, group_rows)
    assert "REPRODUCED" in lines[0] and "KD improves" in lines[0]
    assert "NOT REPRODUCED" not in lines[0]
    assert "CONTRADICTED" in lines[3]          # the similarity teacher is worse here
    assert lines[5].startswith(f"{FASHION}: instance + domain") and "consistent" in lines[5]


def test_tang_entry_defaults_to_five_seeds():
    from kdengine import repro

    e = repro.registry()["tang"]
    assert e.seeds == (0, 1, 2, 3, 4) and e.quick_minutes <= 1 and e.minutes <= 10


@pytest.mark.slow
def test_tang_quick_entry_writes_paired_results(tmp_path):
    import json

    from kdengine import repro

    n = torch.get_num_threads()
    assert repro.main(["tang", "--quick", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == n
    res = json.loads((tmp_path / "tang.json").read_text())
    assert res["seeds"] == [0, 1, 2, 3, 4] and res["tuning"] and res["departures"]
    students = [r for r in res["rows"] if "reference" not in r["method"]]
    assert {r["dataset"] for r in students} == {"Fashion-MNIST", "synthetic"}
    seeds = {}
    for r in students:
        seeds.setdefault((r["dataset"], r["method"]), set()).add(r["seed"])
    assert all(s == {0, 1, 2, 3, 4} for s in seeds.values()) and len(seeds) == 12
    assert {c["baseline"] for c in res["paired"]} == {"CE (student alone)"}
    md = (tmp_path / "tang.md").read_text()
    assert "against KD (vanilla)" in md and "Shirt" in md and "QUICK run" in md
    assert "Tuned (and on what)" in md and "Departures from the paper" in md
