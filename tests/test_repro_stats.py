"""kdengine.repro.stats: Student-t quantiles and paired per-seed comparisons."""
from __future__ import annotations

import math
import random

import pytest

from kdengine.repro.stats import (
    paired_comparisons,
    paired_difference,
    student_t_cdf,
    student_t_quantile,
)

# Two-sided 95 % critical values, as printed in standard t tables (4 decimals).
T_TABLE_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 10: 2.2281,
               19: 2.0930, 30: 2.0423, 120: 1.9799}


@pytest.mark.parametrize("df,want", sorted(T_TABLE_975.items()))
def test_quantile_matches_printed_tables(df, want):
    assert student_t_quantile(0.975, df) == pytest.approx(want, abs=5e-5)


def test_quantile_limits_and_symmetry():
    # df -> inf: the normal quantile 1.959964
    assert student_t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    # df = 1 is the Cauchy distribution: quantile tan(pi (p - 1/2))
    for p in (0.6, 0.9, 0.99, 0.999):
        assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    # df = 2 has a closed form: (2p - 1) sqrt(2 / (4 p (1 - p)))
    for p in (0.55, 0.8, 0.975):
        want = (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
        assert student_t_quantile(p, 2) == pytest.approx(want, rel=1e-9)
    assert student_t_quantile(0.5, 7) == 0.0
    assert student_t_quantile(0.1, 7) == -student_t_quantile(0.9, 7)


def test_cdf_inverts_quantile_at_random_points():
    rng = random.Random()
    for _ in range(50):
        df = rng.choice([1, 2, 3, 4.5, 9, 29, 200])
        p = rng.uniform(0.001, 0.999)
        assert student_t_cdf(student_t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)


def test_against_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 15, 60, 1000):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.9995):
            assert student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)
        for t in (-30.0, -2.5, -0.3, 0.0, 0.7, 4.0):
            assert student_t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-9, abs=1e-15)


def test_paired_difference_by_hand():
    method = {0: 0.91, 1: 0.92, 2: 0.93, 3: 0.94, 4: 0.95}
    base = {0: 0.90, 1: 0.90, 2: 0.90, 3: 0.90, 4: 0.90}
    p = paired_difference(method, base)
    diffs = [0.01, 0.02, 0.03, 0.04, 0.05]
    assert p.differences == pytest.approx(diffs)
    assert p.mean == pytest.approx(0.03) and p.sd == pytest.approx(math.sqrt(2.5) / 100)
    half = 2.7764451 * (math.sqrt(2.5) / 100) / math.sqrt(5)
    assert (p.ci_low, p.ci_high) == pytest.approx((0.03 - half, 0.03 + half), rel=1e-6)
    assert p.excludes_zero and (p.wins, p.losses, p.ties) == (5, 0, 0)


def test_pairing_removes_the_shared_seed_spread():
    """Seeds that move both arms together: unpaired the arms overlap, paired the gain is clear."""
    shift = {s: 0.05 * math.sin(3 * s) for s in range(6)}
    base = {s: 0.80 + shift[s] for s in range(6)}
    method = {s: 0.81 + shift[s] + (0.001 if s % 2 else -0.001) for s in range(6)}
    p = paired_difference(method, base)
    assert p.excludes_zero and p.ci_low > 0.005
    spread = math.hypot(*(math.sqrt(sum((v[s] - sum(v.values()) / 6) ** 2 for s in v) / 5)
                          for v in (method, base)))
    assert spread > 0.03  # an unpaired comparison would call the 0.01 gain noise


def test_paired_difference_errors_and_one_seed():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference({0: 1.0, 1: 1.0}, {0: 1.0, 2: 1.0})
    with pytest.raises(ValueError, match="at least one seed"):
        paired_difference({}, {})
    with pytest.raises(ValueError, match="finite"):
        paired_difference({0: float("nan")}, {0: 1.0})
    with pytest.raises(ValueError, match="confidence"):
        paired_difference({0: 1.0}, {0: 1.0}, confidence=1.5)
    with pytest.raises(TypeError, match="mappings"):
        paired_difference([1.0], [1.0])
    one = paired_difference({7: 0.5}, {7: 0.4})
    assert one.ci_low is None and not one.excludes_zero and one.mean == pytest.approx(0.1)
    with pytest.raises(ValueError, match="df"):
        student_t_quantile(0.9, 0)
    with pytest.raises(ValueError, match="p must be"):
        student_t_quantile(1.0, 3)


def test_paired_comparisons_groups_and_notes():
    rows = []
    for seed in range(5):
        for ds in ("a", "b"):
            rows.append({"dataset": ds, "method": "ce", "seed": seed, "acc": 0.80 + 0.01 * seed})
            gain = 0.02 if ds == "a" else (0.01 if seed % 2 else -0.01)
            rows.append({"dataset": ds, "method": "kd", "seed": seed, "acc": 0.80 + 0.01 * seed + gain})
    out = paired_comparisons(rows, baseline="ce", metric="acc", within=("dataset",))
    by = {r["dataset"]: r for r in out}
    assert by["a"]["excludes_zero"] and by["a"]["mean"] == pytest.approx(2.0)
    assert "better than ce by +2.00 points" in by["a"]["note"]
    assert not by["b"]["excludes_zero"] and "not distinguishable from ce" in by["b"]["note"]
    assert by["b"]["wins"] == 2 and by["b"]["losses"] == 3
    with pytest.raises(ValueError, match="two rows"):
        paired_comparisons(rows + [rows[0]], baseline="ce", metric="acc", within=("dataset",))
    with pytest.raises(ValueError, match="no 'xx' rows"):
        paired_comparisons(rows, baseline="xx", metric="acc", within=("dataset",))
    with pytest.raises(KeyError, match="'acc'"):
        paired_comparisons([{"method": "ce", "seed": 0}], baseline="ce", metric="acc")


def test_write_results_reports_paired_differences_tuning_and_departures(tmp_path):
    import json

    from kdengine.repro.common import write_results

    rows = [{"dataset": "d", "method": m, "seed": s, "test_acc": 0.7 + 0.01 * s + (0.02 if m == "kd" else 0.0)}
            for s in range(3) for m in ("ce", "kd")]
    res = write_results("x", rows, tmp_path, title="t", plot=False,
                        paired={"baseline": "ce", "metric": "test_acc", "within": ("dataset",)},
                        tuning=["T on val: 4"], departures=["5 seeds, not 3"])
    md = (tmp_path / "x.md").read_text()
    assert "Paired by seed against ce (test_acc)" in md and "| d | kd | +2.00 | [+2.00, +2.00] | 3 / 0 |" in md
    assert "Tuned (and on what):\n- T on val: 4" in md and "Departures from the paper:\n- 5 seeds, not 3" in md
    assert "kd: better than ce by +2.00 points" in md
    payload = json.loads((tmp_path / "x.json").read_text())
    assert payload["paired"][0]["mean"] == pytest.approx(2.0) and payload["departures"] == ["5 seeds, not 3"]
    assert set(res["paths"]) == {"json", "md"}


def test_claim_notes_verdict_words():
    from kdengine.repro.stats import claim_notes

    rows = [{"dataset": "d", "method": m, "seed": s, "test_acc": 0.8 + 0.01 * s + g}
            for s in range(4) for m, g in (("ce", 0.0), ("up", 0.02), ("down", -0.02),
                                           ("flat", 0.01 if s % 2 else -0.01))]
    out = claim_notes(rows, [("up beats ce", "up", "ce"), ("down beats ce", "down", "ce"),
                             ("flat beats ce", "flat", "ce")], label="D")
    assert out[0].startswith("D: up beats ce: REPRODUCED: up - ce on test_acc = +2.00 points, 95 % CI [")
    assert out[1].startswith("D: down beats ce: CONTRADICTED (worse)")
    assert out[2].startswith("D: flat beats ce: NOT REPRODUCED (interval includes 0)")
    one = claim_notes([r for r in rows if r["seed"] == 0], [("up beats ce", "up", "ce")], label="D")
    assert one == ["D: up beats ce: no interval (fewer than 2 seeds)"]
