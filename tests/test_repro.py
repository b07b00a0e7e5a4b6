"""`kdengine repro`: where results go (./kdengine-results, --out, --record), the refusals, --list,
help text on every flag, and the atomic results writer.

Every test points the checkout's benches/results at a temporary folder: nothing here may write
the committed results.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from kdengine import repro
from kdengine.repro.common import write_results
from kdengine.repro.results import write_file, write_files


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch):
    """A stand-in for the checkout's benches/results, and a dummy entry that writes result files."""
    committed = tmp_path / "checkout" / "benches" / "results"
    committed.mkdir(parents=True)
    monkeypatch.setattr(repro, "checkout_results_dir", lambda: committed)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    calls = []

    @repro.register("_test_out", "writes one result", minutes=0.1, quick_minutes=0.1)
    def _entry(args: repro.ReproArgs) -> dict:
        calls.append(args)
        rows = [{"dataset": "d", "method": "m", "seed": s, "test_acc": 0.5} for s in args.seeds]
        return write_results("out_test", rows, args.out_dir, title="t", plot=False, seeds=args.seeds)

    @repro.register("_test_one", "a single-seed entry", minutes=0.1, quick_minutes=0.1, seeds=(0,),
                    record_subdir="", threads=1)
    def _one(args: repro.ReproArgs) -> dict:
        calls.append(args)
        args.threads_seen = torch.get_num_threads()
        return {}

    yield committed, work, calls
    repro._REGISTRY.pop("_test_out", None)
    repro._REGISTRY.pop("_test_one", None)


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_default_output_is_kdengine_results_in_the_current_directory(fake_checkout):
    committed, work, calls = fake_checkout
    assert repro.main(["_test_out", "--seeds", "3"]) == 0
    assert calls[-1].out_dir == Path("kdengine-results")
    assert _files(work) == ["kdengine-results/out_test.json", "kdengine-results/out_test.md"]
    assert json.loads((work / "kdengine-results" / "out_test.json").read_text())["seeds"] == [3]
    assert _files(committed) == []


def test_out_dir_and_quick_write_there(fake_checkout, tmp_path):
    committed, work, calls = fake_checkout
    out = tmp_path / "elsewhere"
    assert repro.main(["_test_out", "--quick", "--out", str(out)]) == 0
    assert calls[-1].quick and calls[-1].seeds == [0, 1, 2]
    assert _files(out) == ["out_test.json", "out_test.md"]
    assert _files(work) == [] and _files(committed) == []


def test_record_writes_the_checkouts_results(fake_checkout):
    committed, work, calls = fake_checkout
    assert repro.main(["_test_out", "--record", "--seeds", "0"]) == 0
    assert _files(committed) == ["repro/out_test.json", "repro/out_test.md"]
    assert repro.main(["_test_one", "--record"]) == 0
    assert calls[-1].out_dir == committed     # record_subdir "" = benches/results itself
    assert _files(work) == []


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--record"], "a quick run is never committed"),
    (["--record", "--out", "x"], "exclusive"),
])
def test_record_refusals(fake_checkout, capsys, argv, message):
    committed, work, calls = fake_checkout
    assert repro.main(["_test_out", *argv]) == 2
    assert message in capsys.readouterr().err
    assert calls == [] and _files(committed) == [] and _files(work) == []


def test_single_seed_entry_refuses_several_seeds(fake_checkout, capsys):
    _, _, calls = fake_checkout
    assert repro.main(["_test_one", "--seeds", "0", "1"]) == 2
    assert "one seed at a time" in capsys.readouterr().err
    assert repro.main(["_test_one"]) == 0 and calls[-1].seeds == [0]


def test_entry_runs_with_its_threads_and_restores_them(fake_checkout):
    _, _, calls = fake_checkout
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert repro.main(["_test_one"]) == 0
        assert calls[-1].threads_seen == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_out_that_is_a_file_is_refused(fake_checkout, capsys):
    _, work, calls = fake_checkout
    (work / "f").write_text("x")
    assert repro.main(["_test_out", "--out", "f"]) == 2
    assert "not a folder" in capsys.readouterr().err and calls == []


def test_list_shows_every_entry_with_description_and_run_time(capsys):
    assert repro.main(["--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    reg = repro.registry()
    assert {"tinf", "tang", "london", "metadistil", "iekd", "binary_mnist", "crossbar_mnist",
            "snn_mnist"} <= set(reg)
    for name, e in reg.items():
        line = next(ln for ln in out if ln.split()[0] == name)
        assert e.description in line and e.run_time() in line and "--quick ~" in line, line


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


def test_every_flag_has_help():
    from kdengine.demo.command import add_arguments

    for p in (repro._parser(), add_arguments(argparse.ArgumentParser())):
        acts = _options(p)
        assert acts
        for a in acts:
            assert a.help and a.help.strip(), a.option_strings or a.dest
    helps = {a.dest: a.help for a in _options(repro._parser())}
    assert helps["record"] == "write into the checkout's committed benches/results/ (for maintainers)"


def test_atomic_writer_replaces_whole_files_and_cleans_up(tmp_path):
    target = tmp_path / "r.json"
    write_file(target, "old")
    write_file(target, b"new")
    assert target.read_bytes() == b"new"

    def broken(path: str) -> None:
        Path(path).write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_file(target, broken)
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["r.json"]     # no temp file left beside it
    assert write_file(target, lambda path: "no matplotlib") == "no matplotlib"
    assert target.read_text() == "new"
    assert write_files(tmp_path / "sub", {"a.md": "a", "b.png": lambda p: "skipped"}) == {
        "a.md": str(tmp_path / "sub" / "a.md")}
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.md"]


def test_writer_temp_file_is_in_the_target_folder_and_keeps_the_suffix(tmp_path):
    seen = []

    def record(path: str) -> None:
        seen.append(Path(path))
        Path(path).write_text("x")

    write_file(tmp_path / "plot.png", record)
    assert seen[0].parent == tmp_path and seen[0].suffix == ".png" and seen[0].name != "plot.png"
    assert not seen[0].exists() and (tmp_path / "plot.png").read_text() == "x"


@pytest.mark.slow
def test_binary_mnist_quick_entry_writes_its_results(tmp_path, fake_checkout):
    committed, _, _ = fake_checkout
    assert repro.main(["binary_mnist", "--quick", "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "binary_mnist.json").read_text())
    assert res["data"]["n_train"] == 2000 and res["data"]["n_test"] == 500
    assert set(res["variants"]) == {"float", "weights", "both"}
    for name, v in res["variants"].items():
        assert v["test_accuracy"] > 0.5, name
        if name == "float":
            continue
        # the packed model predicts what the trained one did, at 1 bit per binary weight
        assert v["packed_vs_trained_prediction_mismatches"] == 0, name
        assert v["packed_test_accuracy"] == v["test_accuracy"], name
        # 32x less padding of each filter to whole words and the per-channel scales (width 8 here)
        assert v["binary_layers_compression"] > 25, name
        # the whole model shrinks less: its first and last layers stay float
        assert v["packed_state_bytes"] * 4 < v["fp32_state_bytes"], name
    assert "| both |" in (tmp_path / "o" / "binary_mnist.md").read_text()
    assert _files(committed) == []
