"""README.md's "Measured" tables are the committed result files, rendered by
``python -m kdengine.bench.readme``: a number in README that differs from benches/results fails."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdengine.bench import readme

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"


def test_readme_matches_committed_results(capsys):
    rc = readme.main(["--check", "--readme", str(ROOT / "README.md"), "--results", str(RESULTS)])
    assert rc == 0, f"README.md is stale: run `python -m kdengine.bench.readme`\n{capsys.readouterr().out}"


def test_every_region_is_there():
    text = (ROOT / "README.md").read_text()
    for name in readme.GENERATORS:
        assert f"<!-- results:{name} -->" in text and f"<!-- /results:{name} -->" in text


def test_changed_number_is_caught(tmp_path):
    text = (ROOT / "README.md").read_text()
    llm = json.loads((RESULTS / "llm.json").read_text())
    fused = next(r for r in llm["rows"] if r["impl"] == "kdengine fused-linear")
    shown = f"{fused['peak_extra_MB']:.0f} MiB"
    assert shown in text
    bad = tmp_path / "README.md"
    bad.write_text(text.replace(shown, f"{int(shown.split()[0]) + 1} MiB", 1))
    assert readme.main(["--check", "--readme", str(bad), "--results", str(RESULTS)]) == 1
    # regenerating fixes it, and a second run changes nothing
    assert readme.main(["--readme", str(bad), "--results", str(RESULTS)]) == 0
    assert bad.read_text() == text
    assert readme.main(["--readme", str(bad), "--results", str(RESULTS)]) == 0
    assert bad.read_text() == text


def test_changed_result_file_is_caught(tmp_path):
    res = tmp_path / "results"
    shutil.copytree(RESULTS, res, ignore=shutil.ignore_patterns("*.png", "repro"))
    data = json.loads((res / "bench_cpu.json").read_text())
    data["rows"][0]["median_s"] *= 2
    (res / "bench_cpu.json").write_text(json.dumps(data))
    assert readme.main(["--check", "--readme", str(ROOT / "README.md"), "--results", str(res)]) == 1


def test_missing_region_fails(tmp_path):
    bad = tmp_path / "README.md"
    bad.write_text((ROOT / "README.md").read_text().replace("<!-- /results:demo -->", ""))
    assert readme.main(["--check", "--readme", str(bad), "--results", str(RESULTS)]) == 1


@pytest.mark.parametrize("kd,ce,word", [(0.95, 0.96, "does not beat"), (0.96, 0.96, "does not beat"),
                                        (0.9665, 0.9655, "beats")])
def test_kd_vs_ce_said_plainly(kd, ce, word):
    d = {"student": {"test_accuracy": kd}, "student_ce": {"test_accuracy": ce}, "data": {"n_test": 2000}}
    line = readme.kd_vs_ce(d)
    assert word in line
    if word == "beats":
        assert "does not" not in line and "2 of 2000" in line


def test_generated_numbers_come_from_the_files():
    demo = json.loads((RESULTS / "demo.json").read_text())
    text = readme.demo(RESULTS)
    assert f"{demo['table'][0]['accuracy']:.4f}" in text and demo["machine"]["date"] in text
    cpu = json.loads((RESULTS / "bench_cpu.json").read_text())
    assert cpu["machine"]["date"] in readme.bench_cpu(RESULTS)


def test_repro_region_lists_claim_verdicts_and_entries_without_them(tmp_path):
    (tmp_path / "repro").mkdir()
    claim = "F: KD improves on CE: REPRODUCED: KD - CE on test_acc = +0.47 points, 95 % CI [+0.20, +0.74]"
    (tmp_path / "repro" / "a.json").write_text(json.dumps({
        "title": "Paper A", "seeds": [0, 1, 2, 3, 4], "wall_s": 120.0, "machine": {"cpu": "cpuX"},
        "paired": [{"note": "x"}], "notes": ["x", claim]}))
    (tmp_path / "repro" / "b.json").write_text(json.dumps({
        "title": "Paper B", "seeds": [0, 1, 2], "data": "MNIST: the split", "notes": ["B beats A"]}))
    text = readme.repro(tmp_path)
    head = "**Paper A** (`kdengine repro a`; seeds 0, 1, 2, 3, 4; 2.0 min on cpuX; details and 0 departures"
    assert f"- {claim}" in text and head in text
    assert "`b` (MNIST, 3 seeds)" in text and "B beats A" not in text
