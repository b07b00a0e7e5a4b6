"""Checkpoint integrity (item 7): hashed tensors and JSON, errors naming the file, temp-file
cleanup and the file mode of a save."""
from __future__ import annotations

import json
import os
import struct
import warnings

import pytest
import torch
from safetensors.torch import save as st_save

from kdengine.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint


def _save(path):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(path, modules={"m": m}, optimizers={"o": opt}, state={"epoch": 2, "global_step": 40})
    return m, opt


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


def _load(path):
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    return load_checkpoint(path, modules={"m": m}, optimizers={"o": opt}, restore_rng=False)


def test_round_trip_still_works(tmp_path):
    p = tmp_path / "ck.safetensors"
    m, _ = _save(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load(p) == {"epoch": 2, "global_step": 40}
    tensors, meta = read_checkpoint(p)
    assert isinstance(meta["payload_sha256"], str) and isinstance(meta["meta_sha256"], str)


def test_flipped_byte_in_a_weight(tmp_path):
    p = tmp_path / "ck.safetensors"
    _save(p)
    data = bytearray(p.read_bytes())
    n, header = _split(bytes(data))
    lo, _ = header["module/m/weight"]["data_offsets"]
    data[8 + n + lo + 1] ^= 0x10  # a mantissa bit of the first weight: still a finite float
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="hash") as ei:
        _load(p)
    assert str(p) in str(ei.value)


def test_edited_global_step(tmp_path):
    p = tmp_path / "ck.safetensors"
    _save(p)
    data = p.read_bytes()
    n, header = _split(data)
    meta = json.loads(header["__metadata__"]["kdengine"])
    meta["state"]["global_step"] = 4000
    header["__metadata__"]["kdengine"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(ValueError, match="hash") as ei:
        _load(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("keep", [5, 100, -10])
def test_truncated_file(tmp_path, keep):
    p = tmp_path / "ck.safetensors"
    _save(p)
    data = p.read_bytes()
    p.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(ValueError) as ei:
        _load(p)
    assert str(p) in str(ei.value)


def test_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError) as ei:
        read_checkpoint(tmp_path)
    assert str(tmp_path) in str(ei.value)


def test_old_checkpoint_without_hashes_loads_with_a_warning(tmp_path):
    p = tmp_path / "old.safetensors"
    m = torch.nn.Linear(4, 3)
    tensors = {f"module/m/{k}": v.contiguous() for k, v in m.state_dict().items()}
    meta = {"format": "kdengine-checkpoint/1", "modules": ["m"], "optimizers": {}, "schedulers": {},
            "state": {"epoch": 1}}
    p.write_bytes(st_save(tensors, metadata={"kdengine": json.dumps(meta)}))
    m2 = torch.nn.Linear(4, 3)
    with pytest.warns(UserWarning, match="no integrity hashes") as rec:
        assert load_checkpoint(p, modules={"m": m2}, restore_rng=False) == {"epoch": 1}
    assert str(p) in str(rec[0].message)
    assert torch.equal(m2.weight, m.weight)


def test_leftover_temp_file_is_removed_by_the_next_save(tmp_path):
    p = tmp_path / "ck.safetensors"
    stale = [tmp_path / ".ck.safetensors.tmp-abc123", tmp_path / ".ck.safetensors.k3j_9x0q.tmp"]
    other = tmp_path / ".other.safetensors.tmp-abc123"  # another file's temp: left alone
    for f in (*stale, other):
        f.write_bytes(b"partial")
    _save(p)
    assert sorted(os.listdir(tmp_path)) == sorted([".other.safetensors.tmp-abc123", "ck.safetensors"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_file_mode_follows_umask(tmp_path, umask):
    p = tmp_path / "ck.safetensors"
    old = os.umask(umask)
    try:
        _save(p)
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
