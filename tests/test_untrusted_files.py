"""Untrusted model and input files: bounded memory before any check, clean errors (items 6, 8).

Every bad file must be a ValueError naming the file through the Python API, and ``kdengine
infer`` must print ``error: ...`` to stderr and exit 2 (never a traceback, never a hang).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdengine import cli
from kdengine._integrity import manifest_sha256
from kdengine.infer import load, load_input
from kdengine.serialize import save_packed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("untrusted")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    path = d / "model.safetensors"
    save_packed(model, path)
    good_input = d / "x.npy"
    np.save(good_input, np.random.default_rng(0).random((2, 4), dtype=np.float32))
    return d, path, good_input


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _encode(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def _with_manifest_text(model_path: Path, text: str) -> bytes:
    header, payload = _split(model_path.read_bytes())
    header["__metadata__"]["kdengine_manifest"] = text
    return _encode(header, payload)


def _forge(model_path: Path, edit) -> bytes:
    """What an attacker can do: edit the manifest and recompute its (unkeyed) hash."""
    header, _ = _split(model_path.read_bytes())
    manifest = json.loads(header["__metadata__"]["kdengine_manifest"])
    edit(manifest)
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    return _with_manifest_text(model_path, json.dumps(manifest))


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["infer", *map(str, argv), "--repeat", "1"])
    err = capsys.readouterr().err
    return rc, err


def _assert_cli_error(rc: int, err: str, path) -> None:
    assert rc == 2, err
    assert "error:" in err and str(path) in err, err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- item 6: memory


def _huge_layer(m: dict) -> None:
    lin = m["model"]["children"][1]
    assert lin["type"] == "Linear"
    lin["config"]["in_features"] = lin["config"]["out_features"] = 12000  # 576 MB of float32


def test_forged_huge_layer_is_rejected_before_allocating(files):
    """A consistent (re-hashed) manifest describing a 12000x12000 layer over the stored 3x4
    tensors: ValueError at the shape check, with the process's peak RSS barely moving (the old
    code built the 576 MB layer first). Measured in a fresh subprocess (clean maxrss)."""
    d, path, _ = files
    bad = d / "huge.safetensors"
    bad.write_bytes(_forge(path, _huge_layer))
    script = textwrap.dedent(f"""
        import resource, time, json
        import torch
        from kdengine.serialize import load_packed
        torch.zeros(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            load_packed({str(bad)!r})
            out = {{"error": None}}
        except ValueError as exc:
            out = {{"error": str(exc)}}
        out["seconds"] = time.perf_counter() - t0
        out["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["error"] is not None and str(bad) in out["error"] and "shape" in out["error"], out
    assert out["rss_kb"] < 100 * 1024, f"peak RSS grew by {out['rss_kb'] / 1024:.0f} MiB before the error"
    assert out["seconds"] < 5.0


def _npz_bomb(path: Path, nbytes: int) -> None:
    """An .npz whose one member decodes to ``nbytes`` zeros (compresses ~1000x), streamed."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("images.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (nbytes // 16, 16)})
            chunk = bytes(1 << 22)
            left = nbytes
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)


def test_npz_bomb_is_refused_from_the_headers(files, monkeypatch):
    d, _, _ = files
    bomb = d / "bomb.npz"
    _npz_bomb(bomb, 300 * 2**20)  # 300 MiB decoded, ~0.3 MB on disk; default cap 256 MiB
    assert bomb.stat().st_size < 2 * 2**20

    def no_decompress(*a, **k):  # nothing may be decompressed before the size check
        raise AssertionError("np.load called on an over-limit input")

    monkeypatch.setattr(np, "load", no_decompress)
    with pytest.raises(ValueError, match="MiB") as ei:
        load_input(str(bomb))
    assert str(bomb) in str(ei.value) and "max-input-mb" in str(ei.value)


def test_input_cap_keyword_and_flag(files, capsys):
    d, path, _ = files
    small = d / "small_bomb.npz"
    _npz_bomb(small, 4 * 2**20)
    with pytest.raises(ValueError, match="limit"):
        load_input(str(small), max_input_bytes=2**20)
    x, y, _ = load_input(str(small), max_input_bytes=8 * 2**20)
    assert x.shape == (4 * 2**20 // 16, 16) and y is None
    rc, err = _cli(capsys, path, small, "--max-input-mb", "1")
    _assert_cli_error(rc, err, small)
    assert "1.0 MiB" in err


# --------------------------------------------------------------------------- model path kinds


def _in_thread(fn, fifo: Path | None = None, timeout: float = 10.0):
    """Run fn in a daemon thread; if it blocks (reading a FIFO), unblock it and fail."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if fifo is not None:  # open the write end so the blocked reader sees EOF
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            t.join(5)
        pytest.fail("blocked reading a FIFO")
    if "exc" in box:
        raise box["exc"]
    return box.get("value")


def test_directory_as_model(files, capsys):
    d, _, good = files
    with pytest.raises(ValueError, match="directory") as ei:
        load(d)
    assert str(d) in str(ei.value)
    _assert_cli_error(*_cli(capsys, d, good), d)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_as_model_or_input_does_not_hang(files, capsys):
    d, path, good = files
    fifo = d / "model.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="FIFO") as ei:
        _in_thread(lambda: load(fifo), fifo)
    assert str(fifo) in str(ei.value)
    _assert_cli_error(*_in_thread(lambda: _cli(capsys, fifo, good), fifo), fifo)
    fifo_in = d / "input.npy"
    os.mkfifo(fifo_in)
    with pytest.raises(ValueError, match="FIFO"):
        _in_thread(lambda: load_input(str(fifo_in)), fifo_in)
    _assert_cli_error(*_in_thread(lambda: _cli(capsys, path, fifo_in), fifo_in), fifo_in)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_device_as_model():
    """/dev/zero as MODEL: a clear error at once. In a subprocess with a 6 GB address-space limit
    (a reader that trusts the file would read /dev/zero until memory ran out)."""
    script = textwrap.dedent("""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from kdengine.serialize import load_packed
        try:
            load_packed("/dev/zero")
        except ValueError as exc:
            assert "/dev/zero" in str(exc) and "device" in str(exc), exc
        else:
            raise SystemExit("loaded /dev/zero")
        from kdengine import cli
        sys.exit(cli.main(["infer", "/dev/zero", "mnist:test:1"]))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error:" in r.stderr and "/dev/zero" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- item 8: tracebacks


def test_deeply_nested_manifest(files, capsys):
    d, path, good = files
    bad = d / "deep.safetensors"
    bad.write_bytes(_with_manifest_text(path, "[" * 200000 + "]" * 200000))
    with pytest.raises(ValueError, match="nested too deeply") as ei:
        load(bad)
    assert str(bad) in str(ei.value)
    _assert_cli_error(*_cli(capsys, bad, good), bad)


def test_deeply_nested_safetensors_header(files, capsys):
    d, _, good = files
    bad = d / "deep_header.safetensors"
    raw = b"[" * 200000 + b"]" * 200000
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ValueError) as ei:
        load(bad)
    assert str(bad) in str(ei.value)
    _assert_cli_error(*_cli(capsys, bad, good), bad)


def test_nan_in_manifest(files, capsys):
    d, path, good = files
    bad = d / "nan.safetensors"
    header, _ = _split(path.read_bytes())
    manifest = header["__metadata__"]["kdengine_manifest"]
    text = manifest.replace('"format_version": 1', '"format_version": 1, "note": NaN')
    assert "NaN" in text
    bad.write_bytes(_with_manifest_text(path, text))
    with pytest.raises(ValueError, match="NaN") as ei:
        load(bad)
    assert str(bad) in str(ei.value)
    _assert_cli_error(*_cli(capsys, bad, good), bad)


def test_npy_claiming_1e12_elements(files, capsys):
    d, path, _ = files
    bad = d / "huge.npy"
    with open(bad, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        f.write(bytes(64))
    with pytest.raises(ValueError, match="limit") as ei:
        load_input(str(bad))
    assert str(bad) in str(ei.value)
    rc, err = _cli(capsys, path, bad)
    _assert_cli_error(rc, err, bad)
    # raising the cap does not turn it into a MemoryError traceback either
    with pytest.raises(ValueError) as ei:
        load_input(str(bad), max_input_bytes=10**13)
    assert str(bad) in str(ei.value)
