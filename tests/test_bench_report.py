"""`kdengine bench` output: the table (one ratio column, <= 100 columns), the notes on missing
baselines, progress on stderr, the JSON/PNG, and --out / --record around benches/results/.
The suites are replaced by canned rows so that this runs in a second."""
from __future__ import annotations

import json
import re
import sys

import pytest

from kdengine.bench import command, report, timing

KD_ROWS = [
    {"suite": "kd_loss", "case": "fwd+bwd", "shape": "256x8000", "dtype": "float32", "impl": "kdengine[cpu]",
     "median_s": 0.01, "floor_s": 0.002, "copy_GBps": 20.0, "peak_extra_MB": 8.0},
    {"suite": "kd_loss", "case": "fwd+bwd", "shape": "256x8000", "dtype": "float32", "impl": "torch eager",
     "median_s": 0.123, "floor_s": 0.002, "copy_GBps": 20.0, "peak_extra_MB": 62.0},
]
BINARY_ROW = {"suite": "binary", "op": "binary_conv2d", "case": "binary_conv2d", "backend": "cpu",
              "shape": "8x128x14x14->128 k3 p1", "impl": "kdengine[cpu]", "median_s": 0.0016,
              "baseline": "torch conv2d fp32", "baseline_seconds": 0.0046}
INFER_ROWS = [
    {"suite": "infer", "case": "mlp-bin3 784-4096-4096-4096-10 b1 2t", "shape": "1x1x28x28", "dtype": "float32",
     "impl": impl, "median_s": t}
    for impl, t in (("torch eager fp32", 0.0085), ("packed nn.Module eager", 0.0006), ("kdengine.infer", 0.0003))
]
WORDS = re.compile(r"\b(goal|goals|issue|met|NOT met|target)\b", re.I)


def test_comparisons_one_record_per_baseline():
    recs = report.comparisons(KD_ROWS + [BINARY_ROW] + INFER_ROWS)
    assert [(r["suite"], r["baseline"]) for r in recs] == [
        ("kd_loss", "torch eager"), ("binary", "torch conv2d fp32"),
        ("infer", "torch eager fp32"), ("infer", "packed nn.Module eager")]
    assert recs[0]["ratio"] == pytest.approx(12.3)
    assert recs[2]["ratio"] == pytest.approx(0.0085 / 0.0003)
    assert recs[0]["impl"] == "kdengine[cpu]" and recs[2]["impl"] == "kdengine.infer"


def test_table_fits_and_has_one_ratio_column():
    text = report.format_comparisons(KD_ROWS + [BINARY_ROW] + INFER_ROWS)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "12.3x" in text and "torch eager" in text
    headers = [line for line in text.splitlines() if line.startswith("case ")]
    assert headers and all(h.split().count("ratio") == 1 for h in headers)
    assert not WORDS.search(text)


def test_fmt():
    assert report.fmt_seconds(7.6288) == "7.63 s"
    assert report.fmt_seconds(0.033) == "33.0 ms"
    assert report.fmt_seconds(0.00031) == "0.310 ms"
    assert report.fmt_ratio(12.34) == "12.3x" and report.fmt_ratio(0.8) == "0.80x"


def test_missing_baseline_notes_say_why_and_how():
    lines = report.missing_notes([
        {"suite": "if_multistep", "baseline": "spikingjelly IFNode (torch)", "why": "spikingjelly is not importable"},
        {"suite": "llm", "baseline": "liger chunked", "why": "liger-kernel not importable"},
        {"suite": "kd_loss", "baseline": "torch.compile", "why": "skipped (--no-compile)"},
    ])
    assert len(lines) == 3
    assert 'pip install -e ".[bench]"' in lines[0] and "spikingjelly" in lines[0]
    assert 'pip install -e ".[bench]"' in lines[1] and "liger" in lines[1]
    assert "--no-compile" in lines[2]


def test_spikingjelly_absent_is_recorded(monkeypatch):
    from kdengine.bench import spiking

    timing.take_missing()
    monkeypatch.setitem(sys.modules, "spikingjelly", None)
    monkeypatch.setitem(sys.modules, "spikingjelly.activation_based", None)
    assert spiking.spikingjelly_node() is None
    missing = timing.take_missing()
    assert [m["baseline"] for m in missing] == [spiking.SPIKINGJELLY]


def _fake_suites(monkeypatch):
    from kdengine.bench import binary, infer, kd

    def fake_kd(quick=False, with_compile=True):
        timing.progress("kd_loss fwd+bwd 256x8000: kdengine[cpu]")
        timing.missing("kd_loss", "torch.compile", "failed: RuntimeError: no compiler")
        return [dict(r) for r in KD_ROWS]

    monkeypatch.setattr(kd, "run_kd_bench", fake_kd)
    monkeypatch.setattr(binary, "run_binary_bench", lambda quick=False: [dict(BINARY_ROW)])
    monkeypatch.setattr(infer, "run_infer_bench", lambda quick=False: [dict(r) for r in INFER_ROWS])


def _args(argv):
    import argparse

    return command.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_command_progress_table_notes_files(monkeypatch, tmp_path, capsys):
    _fake_suites(monkeypatch)
    out = tmp_path / "r" / "b.json"
    rc = command.run_from_args(_args(["--quick", "--suite", "kd", "--suite", "binary", "--suite", "infer",
                                      "--out", str(out)]))
    assert rc == 0
    cap = capsys.readouterr()
    assert "kd_loss fwd+bwd 256x8000: kdengine[cpu]" in cap.err and "suite infer: start" in cap.err
    assert max(len(line) for line in cap.out.splitlines() if not line.startswith("wrote ")) <= 100
    assert "not measured: torch.compile (kd_loss): failed: RuntimeError: no" in cap.out
    assert not WORDS.search(cap.out)
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 6 and data["missing_baselines"][0]["baseline"] == "torch.compile"
    assert data["machine"]["torch"] and data["comparisons"][0]["ratio"] == pytest.approx(12.3)
    png = out.with_suffix(".png")
    from PIL import Image

    w, h = Image.open(png).size
    assert 800 <= w <= 2000 and 400 <= h <= 1400


def test_no_progress_flag(monkeypatch, tmp_path, capsys):
    _fake_suites(monkeypatch)
    assert command.run_from_args(_args(["--suite", "kd", "--no-progress", "--out", str(tmp_path / "x.json")])) == 0
    assert "[bench" not in capsys.readouterr().err


def test_committed_results_need_record(monkeypatch, capsys):
    _fake_suites(monkeypatch)
    target = command._committed_results() / "should_not_exist.json"
    assert command.run_from_args(_args(["--suite", "kd", "--out", str(target)])) == 2
    assert "--record" in capsys.readouterr().err
    assert not target.exists()
    assert command._out_path(_args([])).as_posix().endswith(command.DEFAULT_OUT)
    assert command._out_path(_args(["--record"])) == command._committed_results() / "bench_cpu.json"


def test_cli_delegates(monkeypatch, tmp_path):
    from kdengine.cli import main

    _fake_suites(monkeypatch)
    assert main(["bench", "--suite", "binary", "--no-progress", "--out", str(tmp_path / "c.json")]) == 0
    assert (tmp_path / "c.json").exists()


def test_suite_notes_are_neutral():
    from kdengine.bench import kd, llm

    lines = kd.notes(KD_ROWS)
    assert any("% of the copy bandwidth measured in this run" in line for line in lines)
    llm_rows = [{"suite": "llm", "impl": llm.FUSED, "shape": "N=1", "median_s": 1.0, "peak_extra_MB": 100.0},
                {"suite": "llm", "impl": llm.EAGER, "shape": "N=1", "median_s": 2.0, "peak_extra_MB": 700.0}]
    lines += llm.notes(llm_rows)
    assert "7.0x the fused path's" in lines[-1]
    assert not any(WORDS.search(line) for line in lines)
