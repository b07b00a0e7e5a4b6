"""save_packed / load_packed: round trip, manifest, and rejection of damaged or forged files."""
from __future__ import annotations

import json
import pickle
import struct
from collections import OrderedDict

import pytest
import torch
from torch import nn

from kdengine import _integrity
from kdengine.nn import BinaryLinear, PackedBinaryConv2d, PackedBinaryLinear, binarize_model, pack_model
from kdengine.serialize import FORMAT_VERSION, load_packed, read_manifest, save_packed


def _packed_model(mode: str = "both") -> nn.Module:
    """Every supported layer type at least once, nested Sequentials, odd K."""
    tail = nn.Sequential(OrderedDict([
        ("fc", nn.Linear(30, 33)), ("bn", nn.BatchNorm1d(33)), ("act", nn.Hardtanh()),
        ("fc2", nn.Linear(33, 7, bias=False)), ("id", nn.Identity()), ("out", nn.Linear(7, 4)),
    ]))
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True), nn.AvgPool2d(1)),
        nn.BatchNorm2d(5),
        nn.Conv2d(5, 5, (2, 3), padding=(1, 2), dilation=(1, 2)), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), tail,
    )
    b = binarize_model(m, mode=mode)
    b.train()
    with torch.no_grad():
        b(torch.randn(16, 2, 11, 10))
    return pack_model(b)


@pytest.fixture
def saved(tmp_path):
    model = _packed_model()
    path = tmp_path / "m.safetensors"
    save_packed(model, path)
    return model, path


def _rewrite(path, mutate, *, rehash_manifest: bool = True, rehash_payload: bool = False):
    """Re-save ``path`` with ``mutate(manifest, tensors)`` applied (a consistent forgery)."""
    from safetensors.torch import load, save

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    manifest = json.loads(meta["kdengine_manifest"])
    tensors = load(data)
    mutate(manifest, tensors)
    if rehash_payload:
        manifest["payload_sha256"] = _integrity.payload_sha256(tensors)
    if rehash_manifest:
        manifest["manifest_sha256"] = _integrity.manifest_sha256(manifest)
    meta["kdengine_manifest"] = json.dumps(manifest)
    path.write_bytes(save(tensors, metadata=meta))


@pytest.mark.parametrize("mode", ["weights", "both"])
def test_round_trip_identical_outputs(tmp_path, seed, mode):
    model = _packed_model(mode)
    path = tmp_path / "m.safetensors"
    manifest = save_packed(model, path)
    loaded = load_packed(path)
    assert not loaded.training
    assert repr(loaded) == repr(model)
    x = torch.randn(5, 2, 11, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # manifest content
    assert manifest == read_manifest(path)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["kdengine_version"]
    bits = [k for k in manifest["tensors"] if k.endswith("weight_bits")]
    assert len(bits) == 4
    assert all(manifest["tensors"][k]["dtype"] == "int32" for k in bits)
    assert manifest["tensors"]["5.weight_bits"]["shape"] == [5, 1]  # K = 5*2*3 = 30 -> 1 word
    assert manifest["tensors"]["9.fc2.weight_bits"]["shape"] == [7, 2]  # K = 33 -> 2 words
    assert manifest["tensors"]["9.fc2.scale"]["dtype"] == "float32"
    layer = manifest["model"]["children"][5]
    assert layer["type"] == "PackedBinaryConv2d" and layer["config"]["dilation"] == [1, 2]
    assert layer["config"]["mode"] == mode


def test_load_never_unpickles(saved, monkeypatch):
    model, path = saved

    def boom(*a, **k):
        raise AssertionError("pickle / torch.load used")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    load_packed(path)
    assert b"\x80\x04" not in path.read_bytes()[:8]  # not a pickle protocol header


def test_single_layer_round_trip(tmp_path, seed):
    layer = pack_model(BinaryLinear(70, 3, bias=True, mode="both"))
    save_packed(layer, tmp_path / "l.safetensors")
    loaded = load_packed(tmp_path / "l.safetensors")
    assert isinstance(loaded, PackedBinaryLinear)
    x = torch.randn(4, 70)
    assert torch.equal(loaded(x), layer(x))


def test_save_rejects_unsupported_models(tmp_path):
    training = binarize_model(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)))
    with pytest.raises(TypeError, match="pack_model"):
        save_packed(training, tmp_path / "a")
    with pytest.raises(TypeError, match="'1'.*GELU"):
        save_packed(nn.Sequential(nn.Linear(2, 2), nn.GELU()), tmp_path / "b")

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) * 2

    with pytest.raises(TypeError, match="Custom"):
        save_packed(Custom(), tmp_path / "c")
    with pytest.raises(TypeError, match="return_indices"):
        save_packed(nn.Sequential(nn.MaxPool2d(2, return_indices=True)), tmp_path / "d")
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- damaged files


def test_every_single_byte_flip_is_rejected(tmp_path, seed):
    """XOR any one byte of a (small) saved file with 0xFF: load_packed must raise ValueError."""
    model = pack_model(binarize_model(
        nn.Sequential(nn.Linear(3, 40), nn.Linear(40, 5, bias=True), nn.ReLU(), nn.Linear(5, 2)),
        mode="both",
    ))
    path = tmp_path / "m.safetensors"
    save_packed(model, path)
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    undetected = []
    for i in range(len(data)):
        b = bytearray(data)
        b[i] ^= 0xFF
        bad.write_bytes(bytes(b))
        try:
            load_packed(bad)
        except ValueError:
            continue
        undetected.append(i)
    assert not undetected, f"flips at byte offsets {undetected[:10]} of {len(data)} loaded silently"


def test_payload_flip_names_the_hash(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="payload hash mismatch"):
        load_packed(path)


def test_manifest_edit_names_the_manifest(saved):
    _, path = saved
    _rewrite(path, lambda m, t: m["model"]["children"][6]["config"].update(stride=1),
             rehash_manifest=False)
    with pytest.raises(ValueError, match="manifest hash mismatch"):
        load_packed(path)


@pytest.mark.parametrize("cut", [0, 5, 9, 200, -1, -100])
def test_truncated_file(saved, cut):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="truncated"):
        load_packed(path)


def test_trailing_bytes(saved):
    _, path = saved
    path.write_bytes(path.read_bytes() + b"\0\0\0\0")
    with pytest.raises(ValueError, match="trailing"):
        load_packed(path)


def test_bumped_format_version(saved):
    _, path = saved
    _rewrite(path, lambda m, t: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="format_version 2"):
        load_packed(path)


def test_shape_forgery_is_caught_by_the_architecture_check(saved):
    """A consistent file (hashes recomputed) whose bits do not fit the layer's K."""
    _, path = saved

    def mutate(m, t):
        t["9.fc2.weight_bits"] = torch.zeros(7, 3, dtype=torch.int32)
        m["tensors"]["9.fc2.weight_bits"]["shape"] = [7, 3]

    _rewrite(path, mutate, rehash_payload=True)
    with pytest.raises(ValueError, match=r"'9.fc2.weight_bits' has shape \(7, 3\).*\(7, 2\)"):
        load_packed(path)


def test_dtype_forgery(saved):
    _, path = saved

    def mutate(m, t):
        t["9.fc2.weight_bits"] = t["9.fc2.weight_bits"].to(torch.int64)
        m["tensors"]["9.fc2.weight_bits"]["dtype"] = "int64"

    _rewrite(path, mutate, rehash_payload=True)
    with pytest.raises(ValueError, match="'9.fc2.weight_bits' has dtype torch.int64"):
        load_packed(path)


def test_manifest_tensor_table_must_match_the_file(saved):
    _, path = saved
    _rewrite(path, lambda m, t: m["tensors"]["9.fc2.scale"].update(dtype="float64"))
    with pytest.raises(ValueError, match="9.fc2.scale.*manifest says"):
        load_packed(path)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(mode="xor"), "'mode'"),
        (lambda c: c.update(kernel_size=[2, 3, 1]), "'kernel_size'"),
        (lambda c: c.update(stride=0), "'stride'"),
        (lambda c: c.update(extra=1), "unexpected \\['extra'\\]"),
        (lambda c: c.pop("bias"), "missing \\['bias'\\]"),
        (lambda c: c.update(bias="yes"), "'bias'"),
    ],
)
def test_bad_layer_config(saved, edit, match):
    _, path = saved
    _rewrite(path, lambda m, t: edit(m["model"]["children"][5]["config"]))
    with pytest.raises(ValueError, match=match):
        load_packed(path)


def test_unknown_layer_type(saved):
    _, path = saved
    _rewrite(path, lambda m, t: m["model"]["children"][2].update(type="Exec"))
    with pytest.raises(ValueError, match="unknown layer type 'Exec'"):
        load_packed(path)


def test_nonzero_padding_bits_rejected(saved):
    _, path = saved

    def mutate(m, t):
        t["9.fc2.weight_bits"][:, -1] |= 1 << 5  # K = 33: bit 1.. of the last word are padding

    _rewrite(path, mutate, rehash_payload=True)
    with pytest.raises(ValueError, match="padding bits"):
        load_packed(path)


def test_not_a_kdengine_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a kdengine packed model"):
        load_packed(tmp_path / "x.safetensors")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        load_packed(tmp_path / "empty")


def test_float64_full_precision_layers_round_trip(tmp_path):
    m = nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), nn.BatchNorm1d(4, dtype=torch.float64))
    save_packed(m.eval(), tmp_path / "f.safetensors")
    loaded = load_packed(tmp_path / "f.safetensors")
    x = torch.randn(2, 3, dtype=torch.float64)
    assert loaded[0].weight.dtype == torch.float64 and torch.equal(loaded(x), m(x))


def test_loaded_conv_layer_type(saved):
    _, path = saved
    loaded = load_packed(path)
    assert isinstance(loaded[5], PackedBinaryConv2d) and loaded[5].dilation == (1, 2)


@pytest.mark.parametrize("bad", [[0, 28], [1e300], "28", [[1]], list(range(1, 11)), {"h": 1}])
def test_forged_input_shape_is_rejected(saved, bad):
    """A consistent forgery (hash recomputed) with an input_shape that is not 1 to 8 positive ints
    is a ValueError naming the file, not a crash later in the runtime."""
    _, path = saved
    _rewrite(path, lambda m, t: m.__setitem__("input_shape", bad))
    with pytest.raises(ValueError, match="input_shape") as ei:
        load_packed(path)
    assert str(path) in str(ei.value)


def test_input_shape_round_trip(tmp_path):
    from kdengine.serialize import load_packed_with_manifest

    model = _packed_model()
    path = tmp_path / "m.safetensors"
    manifest = save_packed(model, path, input_shape=(2, 11, 10))
    assert manifest["input_shape"] == [2, 11, 10]
    loaded, m = load_packed_with_manifest(path)
    assert m["input_shape"] == [2, 11, 10]
    x = torch.randn(3, 2, 11, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
