"""The hashes that kdengine's files carry (packed models, checkpoints, teacher caches).

``payload_sha256``: sha256 over the tensors in sorted name order, each as its name, dtype name
(``float32``, ``bfloat16``, ``uint8``...), JSON shape and raw little-endian bytes, separated by NUL.
``json_sha256``: sha256 of a JSON header without its own hash fields, in canonical form (sorted
keys, no spaces). A loader recomputes both and compares before trusting anything in the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor


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


def write_sealed_safetensors(path: "str | os.PathLike[str]", tensors: Mapping[str, Tensor],
                             manifest: dict, *, format_name: str, manifest_key: str) -> dict:
    """Add ``payload_sha256`` and ``manifest_sha256`` to ``manifest``, store it as JSON in the
    safetensors metadata under ``manifest_key`` (beside ``format``), and write ``path`` atomically
    (a temporary file beside it, then a rename). Returns the manifest."""
    from safetensors.torch import save as st_save

    manifest["payload_sha256"] = payload_sha256(tensors)
    manifest["manifest_sha256"] = json_sha256(manifest, ("payload_sha256", "manifest_sha256"))
    data = st_save(dict(tensors), metadata={"format": format_name,
                                            manifest_key: json.dumps(manifest, allow_nan=False)})
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return manifest
