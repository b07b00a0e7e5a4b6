"""Save and load packed inference models: safetensors + a JSON manifest, never pickle.

File format (``format_version`` 1)
----------------------------------
One ``.safetensors`` file (https://github.com/huggingface/safetensors: 8-byte little-endian header
length, a JSON header listing every tensor's dtype, shape and byte range, then the raw bytes).

* Tensors: the model's ``state_dict()``, one entry per key (``"3.weight_bits"``, ``"0.weight"``...),
  each stored contiguous in its own dtype: int32 sign bits of the packed layers (the layout of
  :func:`kdengine.ops.pack_signs`: words along K, bit 1 = -1, padding bits 0), float32 ``scale``
  / ``bias``, the full-precision layers' weights and batch-norm statistics.
* The manifest: a JSON string in the safetensors header's ``__metadata__`` under the key
  ``"kdengine_manifest"`` (so there is one file, and the metadata is read without the tensors)::

      {
        "format": "kdengine.packed",
        "format_version": 1,
        "kdengine_version": "0.1.0",
        "model": {"type": "Sequential", "children": [
            {"name": "0", "type": "Conv2d", "config": {"in_channels": 1, ..., "dtype": "float32"}},
            {"name": "1", "type": "PackedBinaryConv2d", "config": {"in_channels": 16, ...,
             "mode": "weights", "bias": false}},
            ...]},
        "tensors": {"0.weight": {"dtype": "float32", "shape": [16, 1, 3, 3]}, ...},
        "input_shape": [1, 28, 28],
        "payload_sha256": "<hex>",
        "manifest_sha256": "<hex>"
      }

  ``model`` describes the architecture completely: :func:`load_packed` rebuilds the modules from
  it alone (no code from the file is ever executed) from a fixed set of layer types:
  ``Sequential`` (nesting), ``Linear``, ``Conv2d``, ``PackedBinaryLinear``,
  ``PackedBinaryConv2d``, ``ReLU``, ``Hardtanh``, ``Identity``, ``MaxPool2d``, ``AvgPool2d``,
  ``Flatten``, ``Dropout``, ``BatchNorm1d``, ``BatchNorm2d``.
* ``input_shape`` (optional; :func:`save_packed`'s ``input_shape``): the shape of one input sample,
  without the batch dimension, so that :mod:`kdengine.infer` can say which input the model expects.
* ``payload_sha256``: sha256 over the tensors in sorted name order, each contributing
  ``name \\0 dtype \\0 shape-as-JSON \\0 raw little-endian bytes``.
  ``manifest_sha256``: sha256 of the manifest without its two hash fields, as canonical JSON
  (sorted keys, no spaces). Together they catch any altered byte of the file.

What :func:`load_packed` checks (each failure is a ValueError naming what is wrong): the path is a
regular file (``os.stat`` first: a directory, FIFO or device is refused before opening), the file is
complete (no truncation, no trailing bytes), the header and manifest are valid JSON (no
NaN/Infinity, no nesting deep enough to exhaust the parser's recursion), the format name and version
are ones this code reads, both hashes, that the tensors in the file are exactly those of the
manifest with the manifest's dtypes and shapes, that every layer config has exactly the expected
keys and value types, that the rebuilt architecture expects exactly these tensors, shapes and dtypes
(checked on the meta device before anything is allocated: the manifest hash is not keyed, so a
forger can describe a huge layer; only the stored tensors, bounded by the file, are trusted for
sizes), and that the padding bits of every packed weight are 0.
"""
from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from kdengine._integrity import (
    check_regular_file,
    check_sealed_manifest,
    kdengine_version,
    payload_sha256,
    write_sealed_safetensors,
)

from kdengine.nn.binary import MODES, BinaryConv2d, BinaryLinear
from kdengine.nn.packed import PackedBinaryConv2d, PackedBinaryLinear

FORMAT_NAME = "kdengine.packed"
FORMAT_VERSION = 1
MANIFEST_KEY = "kdengine_manifest"

__all__ = ["save_packed", "load_packed", "load_packed_with_manifest", "read_manifest", "FORMAT_VERSION", "FORMAT_NAME"]

PathLike = Union[str, "os.PathLike[str]"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
}
_FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
# safetensors' own dtype names (in its header) for the dtypes above.
_ST_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16",
              "I32": "int32", "I64": "int64"}


# --------------------------------------------------------------------------- config schemas
# Each supported layer type: how to read its config from a module, how to validate a config from
# a file (key -> validator) and how to build the module from a validated config.


def _v_int(lo: int | None = None) -> Callable[[Any], int]:
    def f(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"expected an integer >= {lo}, got {v}")
        return v

    return f


def _v_pair(lo: int) -> Callable[[Any], Any]:
    one = _v_int(lo)

    def f(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                raise ValueError(f"expected an integer or a pair of integers, got {v!r}")
            return tuple(one(x) for x in v)
        return one(v)

    return f


def _v_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _v_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {v!r}")
    return float(v)


def _v_optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else inner(v)


def _v_choice(*choices: str) -> Callable[[Any], str]:
    def f(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {choices}, got {v!r}")
        return v

    return f


def _v_conv_padding(v: Any) -> Any:
    if isinstance(v, str):
        return _v_choice("same", "valid")(v)
    return _v_pair(0)(v)


def _v_prob(v: Any) -> float:
    p = _v_float(v)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"expected a probability in [0, 1], got {p}")
    return p


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _param_dtype(m: nn.Module) -> str:
    t = next(iter(m.parameters()), None)
    if t is None:
        t = next(iter(m.buffers()), None)
    name = _DTYPE_NAMES.get(t.dtype) if t is not None else "float32"
    if name not in _FLOAT_DTYPES:
        raise TypeError(f"{type(m).__name__} parameters must be floating, got {t.dtype}")
    return name


_V_DTYPE = _v_choice(*_FLOAT_DTYPES)


class _Spec:
    def __init__(self, cls, schema: dict, get: Callable[[nn.Module], dict], build: Callable[[dict], nn.Module],
                 defaults: Optional[dict] = None):
        # defaults: config keys added after files were written without them (absent = default)
        self.cls, self.schema, self.get, self.build = cls, schema, get, build
        self.defaults = defaults or {}


def _bn_build(cls):
    return lambda c: cls(
        c["num_features"], eps=c["eps"], momentum=c["momentum"], affine=c["affine"],
        track_running_stats=c["track_running_stats"], dtype=_DTYPES[c["dtype"]],
    )


_BN_SCHEMA = {
    "num_features": _v_int(1), "eps": _v_float, "momentum": _v_optional(_v_float),
    "affine": _v_bool, "track_running_stats": _v_bool, "dtype": _V_DTYPE,
}


def _bn_get(m: nn.Module) -> dict:
    return {
        "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
        "track_running_stats": m.track_running_stats, "dtype": _param_dtype(m),
    }


def _maxpool_get(m: nn.MaxPool2d) -> dict:
    if m.return_indices:
        raise TypeError("MaxPool2d(return_indices=True) cannot be saved (its output is a tuple)")
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
            "dilation": m.dilation, "ceil_mode": m.ceil_mode}


_SPECS: dict[str, _Spec] = {
    "Linear": _Spec(
        nn.Linear,
        {"in_features": _v_int(1), "out_features": _v_int(1), "bias": _v_bool, "dtype": _V_DTYPE},
        lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                   "bias": m.bias is not None, "dtype": _param_dtype(m)},
        lambda c: nn.Linear(c["in_features"], c["out_features"], bias=c["bias"], dtype=_DTYPES[c["dtype"]]),
    ),
    "Conv2d": _Spec(
        nn.Conv2d,
        {"in_channels": _v_int(1), "out_channels": _v_int(1), "kernel_size": _v_pair(1),
         "stride": _v_pair(1), "padding": _v_conv_padding, "dilation": _v_pair(1),
         "groups": _v_int(1), "bias": _v_bool,
         "padding_mode": _v_choice("zeros", "reflect", "replicate", "circular"), "dtype": _V_DTYPE},
        lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels,
                   "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                   "dilation": m.dilation, "groups": m.groups, "bias": m.bias is not None,
                   "padding_mode": m.padding_mode, "dtype": _param_dtype(m)},
        lambda c: nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel_size"], stride=c["stride"],
                            padding=c["padding"], dilation=c["dilation"], groups=c["groups"],
                            bias=c["bias"], padding_mode=c["padding_mode"], dtype=_DTYPES[c["dtype"]]),
    ),
    "PackedBinaryLinear": _Spec(
        PackedBinaryLinear,
        {"in_features": _v_int(1), "out_features": _v_int(1), "mode": _v_choice(*MODES), "bias": _v_bool},
        lambda m: {"in_features": m.in_features, "out_features": m.out_features, "mode": m.mode,
                   "bias": m.bias is not None},
        lambda c: PackedBinaryLinear(c["in_features"], c["out_features"], mode=c["mode"], bias=c["bias"]),
    ),
    "PackedBinaryConv2d": _Spec(
        PackedBinaryConv2d,
        {"in_channels": _v_int(1), "out_channels": _v_int(1), "kernel_size": _v_pair(1),
         "stride": _v_pair(1), "padding": _v_pair(0), "dilation": _v_pair(1),
         "mode": _v_choice(*MODES), "bias": _v_bool, "groups": _v_int(1)},
        lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels,
                   "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                   "dilation": m.dilation, "mode": m.mode, "bias": m.bias is not None,
                   **({"groups": m.groups} if m.groups != 1 else {})},
        lambda c: PackedBinaryConv2d(c["in_channels"], c["out_channels"], c["kernel_size"],
                                     stride=c["stride"], padding=c["padding"],
                                     dilation=c["dilation"], mode=c["mode"], bias=c["bias"],
                                     groups=c["groups"]),
        defaults={"groups": 1},
    ),
    "ReLU": _Spec(nn.ReLU, {"inplace": _v_bool}, lambda m: {"inplace": m.inplace},
                  lambda c: nn.ReLU(inplace=c["inplace"])),
    "Hardtanh": _Spec(
        nn.Hardtanh, {"min_val": _v_float, "max_val": _v_float, "inplace": _v_bool},
        lambda m: {"min_val": m.min_val, "max_val": m.max_val, "inplace": m.inplace},
        lambda c: nn.Hardtanh(c["min_val"], c["max_val"], inplace=c["inplace"]),
    ),
    "Identity": _Spec(nn.Identity, {}, lambda m: {}, lambda c: nn.Identity()),
    "MaxPool2d": _Spec(
        nn.MaxPool2d,
        {"kernel_size": _v_pair(1), "stride": _v_pair(1), "padding": _v_pair(0),
         "dilation": _v_pair(1), "ceil_mode": _v_bool},
        _maxpool_get,
        lambda c: nn.MaxPool2d(c["kernel_size"], stride=c["stride"], padding=c["padding"],
                               dilation=c["dilation"], ceil_mode=c["ceil_mode"]),
    ),
    "AvgPool2d": _Spec(
        nn.AvgPool2d,
        {"kernel_size": _v_pair(1), "stride": _v_pair(1), "padding": _v_pair(0),
         "ceil_mode": _v_bool, "count_include_pad": _v_bool, "divisor_override": _v_optional(_v_int(1))},
        lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                   "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad,
                   "divisor_override": m.divisor_override},
        lambda c: nn.AvgPool2d(c["kernel_size"], stride=c["stride"], padding=c["padding"],
                               ceil_mode=c["ceil_mode"], count_include_pad=c["count_include_pad"],
                               divisor_override=c["divisor_override"]),
    ),
    "Flatten": _Spec(
        nn.Flatten, {"start_dim": _v_int(), "end_dim": _v_int()},
        lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim},
        lambda c: nn.Flatten(c["start_dim"], c["end_dim"]),
    ),
    "Dropout": _Spec(
        nn.Dropout, {"p": _v_prob, "inplace": _v_bool},
        lambda m: {"p": m.p, "inplace": m.inplace},
        lambda c: nn.Dropout(c["p"], inplace=c["inplace"]),
    ),
    "BatchNorm1d": _Spec(nn.BatchNorm1d, _BN_SCHEMA, _bn_get, _bn_build(nn.BatchNorm1d)),
    "BatchNorm2d": _Spec(nn.BatchNorm2d, _BN_SCHEMA, _bn_get, _bn_build(nn.BatchNorm2d)),
}
_TYPE_OF = {spec.cls: name for name, spec in _SPECS.items()}
SUPPORTED_TYPES = ("Sequential",) + tuple(_SPECS)


# --------------------------------------------------------------------------- describe / build


def _describe(m: nn.Module, where: str) -> dict:
    label = where or "<root>"
    if type(m) is nn.Sequential:
        children = []
        for name, child in m._modules.items():
            if child is None:
                raise TypeError(f"module {label!r}: Sequential child {name!r} is None")
            path = f"{where}.{name}" if where else name
            children.append({"name": name, **_describe(child, path)})
        return {"type": "Sequential", "children": children}
    if isinstance(m, (BinaryLinear, BinaryConv2d)):
        raise TypeError(
            f"module {label!r} is a training-time {type(m).__name__}; pack the model with "
            "kdengine.nn.pack_model(model) before saving it"
        )
    name = _TYPE_OF.get(type(m))
    if name is None:
        raise TypeError(
            f"module {label!r} has type {type(m).__name__}, which save_packed cannot describe; "
            f"supported types: {', '.join(SUPPORTED_TYPES)} (exact types, no subclasses)"
        )
    if m._modules:
        raise TypeError(f"module {label!r} ({name}) has submodules, which save_packed cannot describe")
    cfg = {k: _jsonable(v) for k, v in _SPECS[name].get(m).items()}
    return {"type": name, "config": cfg}


def _build(node: Any, where: str) -> nn.Module:
    label = where or "<root>"
    if not isinstance(node, dict) or "type" not in node:
        raise ValueError(f"manifest layer {label!r}: expected an object with a 'type', got {node!r}")
    kind = node["type"]
    if kind == "Sequential":
        if set(node) - {"type", "children", "name"} or not isinstance(node.get("children"), list):
            raise ValueError(f"manifest layer {label!r} (Sequential): expected keys type, children (a list)")
        mods: "OrderedDict[str, nn.Module]" = OrderedDict()
        for child in node["children"]:
            cname = child.get("name") if isinstance(child, dict) else None
            if not isinstance(cname, str) or not cname or "." in cname or cname in mods:
                raise ValueError(f"manifest layer {label!r}: bad or repeated child name {cname!r}")
            mods[cname] = _build(child, f"{where}.{cname}" if where else cname)
        return nn.Sequential(mods)
    spec = _SPECS.get(kind)
    if spec is None:
        raise ValueError(
            f"manifest layer {label!r}: unknown layer type {kind!r}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    if set(node) - {"type", "config", "name"}:
        extra = sorted(set(node) - {"type", "config", "name"})
        raise ValueError(f"manifest layer {label!r} ({kind}): unexpected keys {extra}")
    cfg = node.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"manifest layer {label!r} ({kind}): 'config' must be an object")
    cfg = {**spec.defaults, **cfg}
    missing = set(spec.schema) - set(cfg)
    extra = set(cfg) - set(spec.schema)
    if missing or extra:
        raise ValueError(
            f"manifest layer {label!r} ({kind}): config keys do not match; missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}"
        )
    clean = {}
    for key, check in spec.schema.items():
        try:
            clean[key] = check(cfg[key])
        except ValueError as exc:
            raise ValueError(f"manifest layer {label!r} ({kind}): config {key!r}: {exc}") from None
    try:
        return spec.build(clean)
    except Exception as exc:  # the torch constructor's own checks
        raise ValueError(f"manifest layer {label!r} ({kind}): cannot build it: {exc}") from exc


# --------------------------------------------------------------------------- save


def _check_padding_bits(model: nn.Module) -> None:
    """Packed weights must have zero padding bits (the layout contract of pack_signs)."""
    for name, m in model.named_modules():
        if isinstance(m, (PackedBinaryLinear, PackedBinaryConv2d)):
            r = m.k % 32
            if r:
                last = m.weight_bits[:, -1].to(torch.int64) & 0xFFFFFFFF
                if bool(((last >> r) != 0).any()):
                    raise ValueError(
                        f"layer {name!r}: padding bits of weight_bits (beyond K = {m.k}) are not 0"
                    )


MAX_INPUT_DIMS = 8


def check_input_shape(shape: Any, where: str) -> list[int]:
    """``shape`` (one sample's shape, no batch dimension) as a list of 1 to 8 positive ints."""
    if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= MAX_INPUT_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d < 2**31 for d in shape)):
        raise ValueError(
            f"{where}: input_shape must be 1 to {MAX_INPUT_DIMS} positive ints (one sample, no batch "
            f"dimension), got {shape!r}"
        )
    return [int(d) for d in shape]


def save_packed(model: nn.Module, path: PathLike, *, input_shape: Any = None) -> dict:
    """Write ``model`` (a packed inference model, e.g. from :func:`kdengine.nn.pack_model`) to
    ``path`` as one safetensors file with the manifest in its metadata. Returns the manifest.

    ``input_shape``: the shape of one input sample without the batch dimension (e.g.
    ``(1, 28, 28)``), recorded so that :mod:`kdengine.infer` names the expected shape when an
    input does not fit; None records nothing.

    The model must be built from the supported layer types (nested ``nn.Sequential`` and the
    types listed in the module docstring); anything else is a TypeError naming the module. The
    file is written to ``path + ".tmp"`` and renamed, so a crash never leaves half a file at
    ``path``. Nothing is pickled.
    """

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if input_shape is not None:
        input_shape = check_input_shape(input_shape, "save_packed")
    tree = _describe(model, "")
    _check_padding_bits(model)
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    for name, t in state.items():
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which save_packed does not store")
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    # The architecture in the manifest must rebuild exactly these tensors: check it now, at save
    # time, rather than at load time.
    _match_state(_build(json.loads(json.dumps(tree)), ""), tensors, "the model")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kdengine_version": kdengine_version(),
        "model": tree,
        "tensors": {n: {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for n, t in tensors.items()},
    }
    if input_shape is not None:
        manifest["input_shape"] = input_shape
    return write_sealed_safetensors(path, tensors, manifest, format_name=FORMAT_NAME,
                                    manifest_key=MANIFEST_KEY)


# --------------------------------------------------------------------------- load


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _json_loads(text: Any, where: str, what: str) -> Any:
    """Strict JSON for untrusted headers: no NaN/Infinity, no nesting so deep that the parser
    recurses out of stack; every failure a ValueError naming the file."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"{where}: {what} is nested too deeply to be read (file altered?)") from None
    except (TypeError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{where}: {what} is not valid JSON (file altered?): {exc}") from None


def _read_regular_file(where: str) -> bytes:
    """The bytes of ``where``, which must be a regular file: a directory, device or FIFO is a
    ValueError at once (checked with os.stat before opening, so a FIFO never blocks)."""
    check_regular_file(where)
    try:
        with open(where, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it: {exc.strerror or exc}") from None


def _parse_header(data: bytes, where: str) -> tuple[dict, int]:
    if len(data) < 8:
        raise ValueError(f"{where}: truncated: {len(data)} bytes, a safetensors file has at least 8")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(
            f"{where}: truncated: the header says {n} header bytes but only {len(data) - 8} follow"
        )
    header = _json_loads(data[8 : 8 + n], where, "the safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{where}: the safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
            lo, hi = int(lo), int(hi)
        except Exception:
            raise ValueError(f"{where}: tensor {name!r} has no valid data_offsets in the header") from None
        if not 0 <= lo <= hi:
            raise ValueError(f"{where}: tensor {name!r} has invalid data_offsets {info['data_offsets']}")
        end = max(end, hi)
    expected = 8 + n + end
    if len(data) < expected:
        raise ValueError(f"{where}: truncated: expected {expected} bytes, the file has {len(data)}")
    if len(data) > expected:
        raise ValueError(
            f"{where}: {len(data) - expected} unexpected trailing bytes after the tensor data (file altered?)"
        )
    return header, n


def _manifest_from_header(header: dict, where: str) -> dict:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or MANIFEST_KEY not in meta:
        raise ValueError(f"{where}: not a kdengine packed model (no {MANIFEST_KEY!r} in the safetensors metadata)")
    if set(meta) != {"format", MANIFEST_KEY} or meta["format"] != FORMAT_NAME:
        raise ValueError(
            f"{where}: safetensors metadata must be exactly {{'format': {FORMAT_NAME!r}, {MANIFEST_KEY!r}: ...}}, "
            f"got keys {sorted(meta)} (file altered?)"
        )
    manifest = _json_loads(meta[MANIFEST_KEY], where, "the manifest")
    check_sealed_manifest(manifest, where, format_name=FORMAT_NAME, format_version=FORMAT_VERSION)
    if not isinstance(manifest.get("kdengine_version"), str):
        raise ValueError(f"{where}: manifest has no kdengine_version string")
    if not isinstance(manifest.get("tensors"), dict) or "model" not in manifest:
        raise ValueError(f"{where}: manifest lacks 'model' or 'tensors'")
    if manifest.get("input_shape") is not None:
        check_input_shape(manifest["input_shape"], where)
    return manifest


def read_manifest(path: PathLike) -> dict:
    """The manifest of a saved packed model (checks the header and the manifest hash only)."""
    where = os.fspath(path)
    data = _read_regular_file(where)
    header, _ = _parse_header(data, where)
    return _manifest_from_header(header, where)


def _match_state(model: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{what}: tensors do not match the architecture: missing {missing}, unexpected {extra}"
        )
    for name, ref in expected.items():
        t = tensors[name]
        if t.dtype != ref.dtype:
            raise ValueError(f"{what}: tensor {name!r} has dtype {t.dtype}, the architecture expects {ref.dtype}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(t.shape)}, the architecture expects {tuple(ref.shape)}"
            )


def load_packed(path: PathLike, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a model written by :func:`save_packed`; returns it in eval mode on ``device``
    (:func:`load_packed_with_manifest` also returns the checked manifest)."""
    return load_packed_with_manifest(path, device)[0]


def load_packed_with_manifest(path: PathLike, device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, dict]:
    """``(model, manifest)`` of a file written by :func:`save_packed`; the model in eval mode on
    ``device``.

    The architecture is rebuilt from the manifest (a fixed set of layer types; nothing from the
    file is executed, nothing is unpickled). Any inconsistency — truncated file, altered byte,
    unknown format version, dtype or shape that does not match, bad layer config — raises a
    ValueError that names the file and what is wrong.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    where = os.fspath(path)
    data = _read_regular_file(where)
    header, _ = _parse_header(data, where)
    manifest = _manifest_from_header(header, where)

    declared = manifest["tensors"]
    for name, info in header.items():
        if name == "__metadata__":
            continue
        st_dtype = info.get("dtype") if isinstance(info, dict) else None
        if st_dtype not in _ST_DTYPES:
            raise ValueError(f"{where}: tensor {name!r} has dtype {st_dtype!r}, which is not one kdengine stores")
    try:
        tensors = st_load(data)
    except SafetensorError as exc:
        raise ValueError(f"{where}: not a readable safetensors file: {exc}") from None

    missing = sorted(set(declared) - set(tensors))
    extra = sorted(set(tensors) - set(declared))
    if missing or extra:
        raise ValueError(f"{where}: tensors differ from the manifest: missing {missing}, unexpected {extra}")
    for name, t in tensors.items():
        info = declared[name]
        if not isinstance(info, dict) or info.get("dtype") != _DTYPE_NAMES.get(t.dtype):
            raise ValueError(
                f"{where}: tensor {name!r} is stored as {t.dtype}, the manifest says {info!r}"
            )
        if info.get("shape") != list(t.shape):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {list(t.shape)}, the manifest says {info.get('shape')!r}"
            )
    if payload_sha256(tensors) != manifest["payload_sha256"]:
        raise ValueError(f"{where}: tensor payload hash mismatch: the tensor data was altered or corrupted")

    try:
        # The manifest is checked against the stored tensors on the meta device first (no
        # memory): a forged manifest describing a huge layer (hashes recomputed, as anyone can)
        # must not allocate that layer before the shape check rejects it.
        with torch.device("meta"):
            _match_state(_build(manifest["model"], ""), tensors, where)
        model = _build(manifest["model"], "")
        _match_state(model, tensors, where)
        model.load_state_dict(tensors, strict=True)
        _check_padding_bits(model)
    except ValueError:
        raise
    except RecursionError:
        raise ValueError(f"{where}: invalid model description: nested too deeply") from None
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, NotImplementedError) as exc:
        # A malformed manifest that passed the hash can only come from a writer bug or a
        # deliberate forgery; still report it as a bad file, not as an internal error.
        raise ValueError(f"{where}: invalid model description: {type(exc).__name__}: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model = model.to(device)
    for m in model.modules():
        if isinstance(m, (PackedBinaryLinear, PackedBinaryConv2d)):
            m.prepare()
    return model, manifest
