"""Fuzz the model files that kdengine.infer.load reads (hypothesis, ~2,250 mutated files in all).

A saved packed model (safetensors + JSON manifest) is damaged in many ways: byte flips anywhere,
truncation, insertion, deletion, edits of the manifest JSON (with and without a recomputed
manifest hash) and edits of the safetensors tensor table. For every damaged file, loading must
either

* raise a ValueError (a clean, specific error: non-empty, naming the file for damage that the
  hashes or the format checks catch), never another exception type and never a crash; or
* succeed with *the same model*: identical state (names, dtypes, shapes, bytes), identical
  architecture and bit-identical logits on a fixed input (e.g. a flipped byte of JSON
  whitespace in the header).

The one exception is a *forged* manifest whose hash was recomputed: it may describe a different
but valid model, so there the only requirement is ValueError or a model that loads and runs (or
fails to run with a ValueError). Nothing is unpickled anywhere (the format has no pickle).
"""
from __future__ import annotations

import atexit
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdengine import _integrity
from kdengine.infer import load
from kdengine.nn import binarize_model, pack_model
from kdengine.serialize import save_packed

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _model():
    """Small (fast to load) but with a conv and a linear binary layer, odd K (padding bits), BN,
    pooling and full-precision first/last layers."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.BatchNorm2d(3),
        torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.BatchNorm2d(5), torch.nn.Flatten(),
        torch.nn.Linear(5 * 4 * 4, 11), torch.nn.BatchNorm1d(11), torch.nn.Linear(11, 4),
    )
    b = binarize_model(m, mode="both").train()
    with torch.no_grad():
        b(torch.randn(8, 1, 8, 8))  # non-trivial batch-norm statistics
    return pack_model(b)


_DIR = Path(tempfile.mkdtemp(prefix="kdengine_fuzz_"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
_ORIG = _DIR / "orig.safetensors"
save_packed(_model(), _ORIG)
BASE = _ORIG.read_bytes()
_REF = load(_ORIG)
X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
REF_OUT = _REF.predict(X)
REF_STATE = {k: v.clone() for k, v in _REF.module.state_dict().items()}
REF_ARCH = repr(_REF.module)
_HLEN = struct.unpack("<Q", BASE[:8])[0]
HEADER = json.loads(BASE[8 : 8 + _HLEN])
DATA = BASE[8 + _HLEN :]
MANIFEST = json.loads(HEADER["__metadata__"]["kdengine_manifest"])
TARGET = _DIR / "mutated.safetensors"
OUTCOMES: dict[str, dict[str, int]] = {}


def _same_model(m) -> None:
    state = m.module.state_dict()
    assert set(state) == set(REF_STATE)
    for k, v in state.items():
        r = REF_STATE[k]
        assert v.dtype == r.dtype and v.shape == r.shape and torch.equal(v, r), k
    assert repr(m.module) == REF_ARCH
    assert torch.equal(m.predict(X), REF_OUT)


def _check(data: bytes, kind: str, forged: bool = False) -> None:
    TARGET.write_bytes(data)
    tally = OUTCOMES.setdefault(kind, {"rejected": 0, "loaded": 0})
    try:
        m = load(TARGET)
    except ValueError as exc:
        msg = str(exc)
        assert msg, "empty error message"
        if not forged:
            assert str(TARGET) in msg, f"error does not name the file: {msg}"
        tally["rejected"] += 1
        return
    tally["loaded"] += 1
    if not forged:
        _same_model(m)
        return
    try:  # a consistent forgery may be another valid model: it must run or fail cleanly
        m.predict(X)
    except ValueError:
        pass


def _encode(header: dict, data: bytes = DATA) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


# --------------------------------------------------------------------------- raw byte damage


@settings(max_examples=700, **SETTINGS)
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_byte_flips(flips):
    data = bytearray(BASE)
    for pos, mask in flips:
        data[pos] ^= mask
    _check(bytes(data), "flip")


@settings(max_examples=250, **SETTINGS)
@given(st.integers(0, len(BASE) - 1))
def test_truncation(n):
    _check(BASE[:n], "truncate")


@settings(max_examples=250, **SETTINGS)
@given(st.integers(0, len(BASE)), st.binary(min_size=1, max_size=16))
def test_insertion(pos, blob):
    _check(BASE[:pos] + blob + BASE[pos:], "insert")


@settings(max_examples=200, **SETTINGS)
@given(st.integers(0, len(BASE) - 1), st.integers(1, 64))
def test_deletion(pos, n):
    _check(BASE[:pos] + BASE[pos + n :], "delete")


# --------------------------------------------------------------------------- structured edits

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 2**33), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8), st.lists(st.integers(-2, 40), max_size=4),
    st.sampled_from(["float16", "int64", "PackedBinaryLinear", "Sequential", "both", "weights", "zeros"]),
)


def _edit_json(data, node):
    """Walk into ``node`` (a JSON tree, modified in place) and change, delete or add one thing."""
    while True:
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
            child = node[key]
            if isinstance(child, (dict, list)) and child and data.draw(st.integers(0, 3)) > 0:
                node = child
                continue
            action = data.draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                node[key] = data.draw(JSON_VALUES)
            elif action == "delete":
                del node[key]
            else:
                node[data.draw(st.text(min_size=1, max_size=6))] = data.draw(JSON_VALUES)
            return
        if isinstance(node, list) and node:
            i = data.draw(st.integers(0, len(node) - 1))
            child = node[i]
            if isinstance(child, (dict, list)) and child and data.draw(st.integers(0, 3)) > 0:
                node = child
                continue
            action = data.draw(st.sampled_from(["replace", "delete", "duplicate", "swap"]))
            if action == "replace":
                node[i] = data.draw(JSON_VALUES)
            elif action == "delete":
                del node[i]
            elif action == "duplicate":
                node.insert(i, json.loads(json.dumps(child)))
            else:
                j = data.draw(st.integers(0, len(node) - 1))
                node[i], node[j] = node[j], node[i]
            return
        return  # empty container: nothing to edit


def _with_manifest(manifest: dict) -> bytes:
    header = json.loads(json.dumps(HEADER))
    header["__metadata__"]["kdengine_manifest"] = json.dumps(manifest)
    return _encode(header)


@settings(max_examples=350, **SETTINGS)
@given(st.data())
def test_manifest_edits_are_caught_by_the_hash(data):
    manifest = json.loads(json.dumps(MANIFEST))
    _edit_json(data, manifest)
    _check(_with_manifest(manifest), "manifest edit")


@settings(max_examples=300, **SETTINGS)
@given(st.data())
def test_forged_manifests_fail_cleanly(data):
    """The attacker recomputes the manifest hash: the structural checks must still hold."""
    manifest = json.loads(json.dumps(MANIFEST))
    _edit_json(data, manifest)
    if isinstance(manifest.get("manifest_sha256"), str):
        manifest["manifest_sha256"] = _integrity.manifest_sha256(manifest)
    _check(_with_manifest(manifest), "forged manifest", forged=True)


@settings(max_examples=200, **SETTINGS)
@given(st.data())
def test_tensor_table_edits(data):
    header = json.loads(json.dumps(HEADER))
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "rename"]))
    if field == "dtype":
        dtypes = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "Q"]
        header[name]["dtype"] = data.draw(st.sampled_from(dtypes))
    elif field == "shape":
        header[name]["shape"] = data.draw(st.lists(st.integers(0, 70), max_size=4))
    elif field == "data_offsets":
        lo = data.draw(st.integers(0, len(DATA)))
        header[name]["data_offsets"] = [lo, data.draw(st.integers(lo, len(DATA)))]
    elif field == "delete":
        del header[name]
    else:
        header[data.draw(st.text(min_size=1, max_size=8))] = header.pop(name)
    _check(_encode(header), "tensor table edit")


class _HugeAllocation(BaseException):
    """Raised (not Exception: the loader's own handlers must not swallow it) by the guarded
    tensor factories when a real (non-meta) tensor above the limit is about to be made."""


_ALLOC_LIMIT = 1 << 20  # elements; the fuzz model's largest tensor has < 1,000


def _guard_factory(fn):
    def guarded(*size, **kw):
        dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        numel = 1
        for d in dims:
            numel *= int(d)
        device = kw.get("device")
        on_meta = (torch.device(device).type == "meta" if device is not None
                   else torch.get_default_device().type == "meta")
        if not on_meta and numel > _ALLOC_LIMIT:
            raise _HugeAllocation(f"{fn.__name__}{tuple(dims)} before the shape check")
        return fn(*size, **kw)

    return guarded


_SIZE_KEYS = ("in_features", "out_features", "in_channels", "out_channels", "num_features")


@settings(max_examples=60, **SETTINGS)
@given(st.data())
def test_forged_huge_layers_are_rejected_before_allocating(data):
    """A forged (re-hashed) manifest that makes one layer huge while the stored tensors keep
    their shapes: a ValueError from the shape check, and no real tensor beyond ~1M elements is
    ever created (the tensor factories are guarded while loading)."""
    manifest = json.loads(json.dumps(MANIFEST))
    layers = [c for c in manifest["model"]["children"] if set(_SIZE_KEYS) & set(c.get("config", {}))]
    layer = data.draw(st.sampled_from(layers))
    for key in sorted(set(_SIZE_KEYS) & set(layer["config"])):
        if data.draw(st.booleans()) or key == sorted(set(_SIZE_KEYS) & set(layer["config"]))[0]:
            layer["config"][key] = data.draw(st.integers(2**11, 2**16))
    manifest["manifest_sha256"] = _integrity.manifest_sha256(manifest)
    TARGET.write_bytes(_with_manifest(manifest))
    saved = {n: getattr(torch, n) for n in ("empty", "zeros", "ones")}
    try:
        for n, fn in saved.items():
            setattr(torch, n, _guard_factory(fn))
        with pytest.raises(ValueError, match="shape") as ei:
            load(TARGET)
    except _HugeAllocation as exc:
        pytest.fail(f"a huge tensor was allocated from a forged manifest: {exc}")
    finally:
        for n, fn in saved.items():
            setattr(torch, n, fn)
    assert str(TARGET) in str(ei.value)


def test_fuzz_outcomes_were_mostly_rejections():
    """Runs last (file order): the mutations must have been exercised and, apart from the
    harmless ones, rejected (a guard against a fuzzer that silently tested nothing)."""
    if not OUTCOMES:
        pytest.skip("run with the fuzz tests above")
    total = sum(v["rejected"] + v["loaded"] for v in OUTCOMES.values())
    print("fuzz outcomes:", OUTCOMES)
    assert total >= 1000
    for kind in ("flip", "truncate", "manifest edit", "tensor table edit"):
        if kind in OUTCOMES:
            assert OUTCOMES[kind]["rejected"] > 0.8 * (OUTCOMES[kind]["rejected"] + OUTCOMES[kind]["loaded"])
