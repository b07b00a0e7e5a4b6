"""`kdengine demo` end to end in a tiny configuration, plus its argument errors.

The tiny run (a few thousand images, one or two epochs, few SNN steps) goes through every stage
of the real pipeline; the checks re-derive numbers from the written files (the saved packed model
is reloaded and re-scored) instead of trusting the report.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from kdengine.demo import STAGES, make_config, run
from kdengine.demo import inmemory
from kdengine.demo.runtime import MODEL_FILE

TINY = dict(
    n_fit=2000, n_heldout=300, n_calib=300, n_test=400, n_test_snn=200, n_search=100,
    teacher_width=8, teacher_hidden=64, teacher_epochs=2, student_width=8, student_hidden=64,
    student_epochs=2, snn_student_epochs=2, ce_baseline=True,
    latency_rounds=1, latency_per_round=5, snn_latency_images=5,
    t_max=8, t_search=4, t_ref=8, search_percentiles=(99.9,), search_scales=(1.0,),
    search_init_potentials=(0.5,), xbar_seeds=1, xbar_bits_sweep=(2, 4), xbar_ber_sweep=(0.0, 1e-2),
    n_test_xbar_sweep=100,
)
ROW_KEYS = ["teacher", "student", "student_ce", "packed", "crossbar_ideal", "crossbar", "snn_ann", "snn"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = run(quick=True, out=str(out), progress=False, **TINY)
    return res, out


@pytest.mark.slow  # the tiny demo run trains three nets (about 20 s)
def test_table_rows_and_numbers(tiny):
    res, _ = tiny
    rows = res["table"]
    assert [r["key"] for r in rows] == ROW_KEYS
    for r in rows:
        acc = r["accuracy"]
        assert isinstance(acc, float) and math.isfinite(acc), r
        assert 0.2 < acc <= 1.0, f"{r['model']}: accuracy {acc} is not above chance (0.1) by a margin"
        assert isinstance(r["size bytes"], int) and r["size bytes"] > 0, r
    by = {r["key"]: r for r in rows}
    # the table's numbers are the stages' numbers
    assert by["teacher"]["accuracy"] == res["teacher"]["test_accuracy"]
    assert by["packed"]["accuracy"] == res["runtime"]["test_accuracy"]
    assert by["snn"]["time steps"] == res["snn"]["mean_steps"]
    assert 1.0 <= by["snn"]["time steps"] <= TINY["t_ref"]
    assert by["snn"]["test images"] == TINY["n_test_snn"]
    assert by["packed"]["size bytes"] < by["teacher"]["size bytes"]
    for key in ("teacher", "student", "packed", "snn_ann", "snn"):
        p50, p99 = by[key]["batch-1 p50 ms"], by[key]["batch-1 p99 ms"]
        assert 0 < p50 <= p99, (key, p50, p99)
    # the students were trained with the fused KD loss (a "kd" term), the contrast with CE only
    assert "kd_loss" in res["student"]["train"]["loss"]
    assert res["student"]["train"]["last_epoch"]["kd"] > 0
    assert "kd" not in res["student_ce"]["train"]["last_epoch"]
    assert len(res["snn"]["trace_tuned"]) == TINY["t_max"]


@pytest.mark.slow  # the tiny demo run trains three nets (about 20 s)
def test_crossbar_ideal_equals_packed(tiny):
    res, _ = tiny
    x = res["crossbar"]
    assert x["ideal_equals_packed_kernels"] is True
    assert x["ideal_accuracy"] == res["runtime"]["test_accuracy"]
    assert x["tile_activations_per_image"] > 0 and x["adc_conversions_per_image"] > 0
    assert x["adc_conversions_test_pass"] == x["adc_conversions_per_image"] * TINY["n_test"]
    assert not x["digital_binary_layers"]  # every binary layer of the XNOR student is mapped


@pytest.mark.slow  # the tiny demo run trains three nets (about 20 s)
def test_files_written_and_consistent(tiny):
    res, out = tiny
    for name in ("demo.json", "demo.md", MODEL_FILE):
        assert (out / name).is_file(), name
    assert (out / "demo.png").stat().st_size > 10_000  # matplotlib is a dependency: plots always
    js = json.loads((out / "demo.json").read_text())
    assert js["table"] == res["table"]
    assert set(js["stage_seconds"]) == set(STAGES)
    assert all(v >= 0 for v in js["stage_seconds"].values())
    assert js["machine"]["torch"] == torch.__version__ and js["machine"]["date"]
    md = (out / "demo.md").read_text()
    assert "| model | accuracy |" in md and "binary SNN" in md
    # re-score the saved packed model independently: the report's accuracy is the file's
    from kdengine.data import load_mnist
    from kdengine.infer import load

    x, y = load_mnist("test", seed=res["config"]["split_seed"])
    x, y = x[:TINY["n_test"]], y[:TINY["n_test"]]
    acc = float((load(os.fspath(out / MODEL_FILE)).predict(x).argmax(1) == y).double().mean())
    assert round(acc, 4) == res["runtime"]["test_accuracy"]


def test_crossbar_mismatch_is_an_error(monkeypatch):
    """The stage refuses an ideal crossbar that differs from the packed kernels."""
    logits = torch.zeros(3, 10)

    def fake_simulate(model, x, rows=128, **kw):
        return logits + 1e-6, None

    monkeypatch.setattr(inmemory, "simulate", fake_simulate)
    cfg = make_config(True)

    class Bar:
        def update(self, n=1):
            pass

    with pytest.raises(AssertionError, match="bit for bit"):
        inmemory.run_crossbar_stage(None, logits, torch.zeros(3, 1, 28, 28), torch.zeros(3, 1, 28, 28),
                                    torch.zeros(3, dtype=torch.int64), cfg, Bar())


@pytest.mark.parametrize("kw, exc, match", [
    (dict(bogus=1), TypeError, "unknown demo setting"),
    (dict(n_fit=0), ValueError, "n_fit"),
    (dict(threads="2"), TypeError, "threads"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(split_seed=1.5), TypeError, "split_seed"),
    (dict(n_fit=7500, n_heldout=1000), ValueError, "n_fit \\+ n_heldout"),
    (dict(n_test=2001), ValueError, "n_test"),
    (dict(t_ref=64, t_max=32), ValueError, "t_ref"),
    (dict(kd_weight=1.5), ValueError, "kd_weight"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(xbar_ber=-0.1), ValueError, "xbar_ber"),
    (dict(xbar_bits_sweep=()), ValueError, "xbar_bits_sweep"),
])
def test_bad_settings(kw, exc, match):
    with pytest.raises(exc, match=match):
        make_config(False, **kw)


def test_bad_run_arguments(tmp_path):
    with pytest.raises(TypeError, match="out"):
        run(quick=True, out=123, progress=False)
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        run(quick=True, out=str(f), progress=False)
    with pytest.raises(TypeError, match="quick"):
        make_config("yes")


@pytest.mark.parametrize("argv", [["demo", "--threads", "0"], ["demo", "--seed", "-1"],
                                  ["demo", "--threads", "two"], ["demo", "--bogus"]])
def test_cli_bad_arguments(argv, capsys):
    from kdengine.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_out_is_a_file(tmp_path, capsys):
    from kdengine.cli import main

    f = tmp_path / "f"
    f.write_text("x")
    assert main(["demo", "--quick", "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err
