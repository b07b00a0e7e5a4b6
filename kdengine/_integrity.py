"""Integrity of kdengine's files (packed models, checkpoints, teacher caches, inputs): the path
must be a regular file (checked before opening), and the hashes the files carry.

``payload_sha256``: sha256 over the tensors in sorted name order, each as its name, dtype name
(``float32``, ``bfloat16``, ``uint8``...), JSON shape and raw little-endian bytes, separated by NUL.
``json_sha256``: sha256 of a JSON header without its own hash fields, in canonical form (sorted
keys, no spaces). A loader recomputes both and compares before trusting anything in the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor


def check_regular_file(path: "str | os.PathLike[str]", what: str = "file") -> os.stat_result:
    """os.stat ``path`` (never opens it, so a FIFO cannot block) and require a regular file;
    else a ValueError naming the path (FileNotFoundError if it does not exist)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file")
        raise ValueError(f"{path}: is {kind}, not a regular {what}")
    return st


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def payload_sha256(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode("utf-8") + b"\0")
        h.update(dtype_name(t.dtype).encode() + b"\0")
        h.update(json.dumps(list(t.shape)).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_sha256(header: Mapping[str, Any], exclude: Iterable[str], *, allow_nan: bool = False) -> str:
    skip = set(exclude)
    body = {k: v for k, v in header.items() if k not in skip}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=allow_nan)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


SEALS = ("payload_sha256", "manifest_sha256")


def kdengine_version() -> str:
    from kdengine import __version__

    return __version__


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    return json_sha256(manifest, SEALS)


def check_sealed_manifest(m: Any, where: str, *, format_name: str, format_version: int) -> dict:
    """What a manifest of :func:`write_sealed_safetensors` must be before any of its own fields is
    read: a JSON object of ``format_name`` and ``format_version`` carrying both hashes, its own
    hash matching. Returns it; a ValueError naming ``where`` otherwise."""
    if not isinstance(m, dict):
        raise ValueError(f"{where}: the manifest is not a JSON object")
    if m.get("format") != format_name:
        raise ValueError(f"{where}: manifest format is {m.get('format')!r}, expected {format_name!r}")
    ver = m.get("format_version")
    if ver != format_version or isinstance(ver, bool):
        raise ValueError(
            f"{where}: unsupported format_version {ver!r}; this kdengine ({kdengine_version()}) reads "
            f"format_version {format_version}"
        )
    for key in SEALS:
        if not isinstance(m.get(key), str):
            raise ValueError(f"{where}: manifest has no {key}")
    if manifest_sha256(m) != m["manifest_sha256"]:
        raise ValueError(f"{where}: manifest hash mismatch: the manifest was altered or corrupted")
    return m


def write_sealed_safetensors(path: "str | os.PathLike[str]", tensors: Mapping[str, Tensor],
                             manifest: dict, *, format_name: str, manifest_key: str) -> dict:
    """Add ``payload_sha256`` and ``manifest_sha256`` to ``manifest``, store it as JSON in the
    safetensors metadata under ``manifest_key`` (beside ``format``), and write ``path`` atomically
    (a temporary file beside it, then a rename). Returns the manifest."""
    from safetensors.torch import save as st_save

    manifest["payload_sha256"] = payload_sha256(tensors)
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    data = st_save(dict(tensors), metadata={"format": format_name,
                                            manifest_key: json.dumps(manifest, allow_nan=False)})
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return manifest
