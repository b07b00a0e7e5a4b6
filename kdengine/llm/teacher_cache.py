"""Offline teacher cache: run a teacher once, store its top-k log-probs per token, train later.

File format (``format_version`` 1): one ``.safetensors`` file (no pickle) with two tensors and a
JSON manifest in the safetensors metadata under ``"kdengine_teacher_cache"``.

* ``logprobs``: ``(N, k)`` **bfloat16**, the top-k entries of ``log_softmax(teacher_logits / T)``
  in descending order (T = the ``temperature`` given to :func:`build_teacher_cache`, recorded in
  the manifest; the loss must use the same T, or re-temper with
  :func:`kdengine.llm.topk.retemper_topk`).
* ``indices``: ``(N, k, B)`` **uint8**, the token ids packed little-endian in B bytes each:
  B = 2 when V <= 2^16 (uint16), 3 when V <= 2^24 ("uint24", e.g. 128K-token vocabularies),
  else 4. Token id = sum_b byte_b << (8 b).
* N = total number of tokens over all batches, rows in batch order; ``batch_shapes`` in the
  manifest gives each batch's leading shape, so batch i is rows ``offsets[i]:offsets[i+1]``
  reshaped to ``batch_shapes[i] + [k]``.

Bytes per token = k * (2 + B) (plus the header): k = 64 at V = 32000 is 256 bytes, against
2 V = 64000 bytes for dense bf16 logits.

Manifest keys: ``format`` ("kdengine.teacher_cache"), ``format_version``, ``kdengine_version``,
``vocab_size``, ``k``, ``temperature``, ``num_tokens``, ``batch_shapes``, ``index_bytes``,
``index_packing``, ``logprob_dtype``, ``bytes_per_token``, ``source`` (free text describing the
teacher and data), ``tensors`` (dtype and shape of each), ``payload_sha256`` (sha256 over the
tensors in sorted name order, each contributing ``name \\0 dtype \\0 shape-as-JSON \\0 raw bytes``,
the scheme of :mod:`kdengine.serialize`) and ``manifest_sha256`` (of the manifest without the two
hashes, canonical JSON).

:func:`load_teacher_cache` checks the file (complete, header valid JSON, format and version, both
hashes, tensors/dtypes/shapes exactly as the manifest says, every index in [0, V), log-probs
<= 0 and not NaN) and raises ValueError naming the file on any failure.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor

from kdengine._integrity import (
    check_sealed_manifest,
    kdengine_version,
    payload_sha256,
    write_sealed_safetensors,
)

FORMAT_NAME = "kdengine.teacher_cache"
FORMAT_VERSION = 1
MANIFEST_KEY = "kdengine_teacher_cache"

__all__ = [
    "build_teacher_cache",
    "load_teacher_cache",
    "TeacherCache",
    "bytes_per_token",
    "index_bytes_for_vocab",
    "teacher_cache_report",
    "pack_indices",
    "unpack_indices",
]

PathLike = Union[str, "os.PathLike[str]"]
_ST_NAMES = {torch.uint8: "uint8", torch.bfloat16: "bfloat16"}
_EXPECTED_ST = {"indices": "U8", "logprobs": "BF16"}


def index_bytes_for_vocab(vocab_size: int) -> int:
    """Bytes per packed token id: 2 (V <= 2^16), 3 (V <= 2^24) or 4."""
    if vocab_size <= 1 << 16:
        return 2
    if vocab_size <= 1 << 24:
        return 3
    return 4


def bytes_per_token(k: int, vocab_size: int) -> int:
    """Stored bytes per token of a cache: k bf16 log-probs + k packed ids."""
    return int(k) * (2 + index_bytes_for_vocab(int(vocab_size)))


def pack_indices(indices: Tensor, nbytes: int) -> Tensor:
    """int token ids (...,) -> uint8 (..., nbytes), little-endian."""
    idx = indices.to(torch.int64)
    return torch.stack([((idx >> (8 * b)) & 0xFF) for b in range(nbytes)], dim=-1).to(torch.uint8)


def unpack_indices(packed: Tensor) -> Tensor:
    """uint8 (..., nbytes) -> int64 token ids (...)."""
    out = packed[..., 0].to(torch.int64)
    for b in range(1, packed.shape[-1]):
        out = out | (packed[..., b].to(torch.int64) << (8 * b))
    return out


def _logits_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"the teacher returned {type(out).__name__}; expected a logits tensor (..., V), a mapping "
        "with 'logits', an object with .logits, or a tuple whose first item is the logits"
    )


# --------------------------------------------------------------------------- build


@torch.no_grad()
def build_teacher_cache(
    teacher: Callable[[Any], Any],
    batches: Iterable[Any],
    path: PathLike,
    k: int,
    temperature: float = 1.0,
    *,
    source: str = "",
    device: Optional[Union[str, torch.device]] = None,
) -> dict:
    """Run ``teacher`` over ``batches`` and write the top-k log-probs of every token to ``path``.

    Args:
        teacher: an ``nn.Module`` or any callable; ``teacher(batch)`` returns logits ``(..., V)``
            (or a mapping / object carrying ``logits``). Evaluated under ``torch.no_grad()``;
            a module is put in eval mode for the run and restored after.
        batches: iterable of inputs (tensors, or anything the teacher takes; a tensor is moved
            to ``device`` when given).
        path: the ``.safetensors`` file to write (via ``path + ".tmp"`` and a rename).
        k: entries kept per token, 1 <= k <= V.
        temperature: T; the cache stores ``log_softmax(logits / T)`` (fp32 math, stored bf16).
        source: free text recorded in the manifest (teacher name, dataset, split...).

    Returns:
        The manifest (also has ``bytes_per_token``). The whole cache is held in memory while
        building (N x k x (2 + B) bytes); shard a large dataset over several files.
    """

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    t = float(temperature)
    if not (t > 0) or math.isinf(t):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if not isinstance(source, str):
        raise TypeError(f"source must be a string, got {type(source).__name__}")
    was_training = None
    if isinstance(teacher, torch.nn.Module):
        was_training = teacher.training
        teacher.eval()
    vocab = None
    lps: list[Tensor] = []
    idxs: list[Tensor] = []
    shapes: list[list[int]] = []
    try:
        for i, batch in enumerate(batches):
            if device is not None and isinstance(batch, Tensor):
                batch = batch.to(device)
            logits = _logits_of(teacher(batch))
            if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
                raise TypeError(f"batch {i}: the teacher's logits must be a floating tensor (..., V)")
            v = logits.shape[-1]
            if vocab is None:
                vocab = v
                if k > v:
                    raise ValueError(f"k = {k} is larger than the teacher's vocabulary V = {v}")
            elif v != vocab:
                raise ValueError(f"batch {i}: the teacher's vocabulary changed from V = {vocab} to {v}")
            flat = logits.reshape(-1, v).float()
            lp = torch.log_softmax(flat / t, dim=-1)
            vals, ind = lp.topk(k, dim=-1)
            lps.append(vals.to(torch.bfloat16).cpu())
            idxs.append(ind.cpu())
            shapes.append([int(d) for d in logits.shape[:-1]])
    finally:
        if was_training is not None:
            teacher.train(was_training)
    if vocab is None:
        raise ValueError("batches is empty: nothing to cache")
    nb = index_bytes_for_vocab(vocab)
    logprobs = torch.cat(lps).contiguous() if lps else torch.zeros(0, k, dtype=torch.bfloat16)
    packed = pack_indices(torch.cat(idxs), nb).contiguous()
    tensors = {"indices": packed, "logprobs": logprobs}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kdengine_version": kdengine_version(),
        "vocab_size": int(vocab),
        "k": int(k),
        "temperature": t,
        "num_tokens": int(logprobs.shape[0]),
        "batch_shapes": shapes,
        "index_bytes": nb,
        "index_packing": f"uint8 x {nb}, little-endian",
        "logprob_dtype": "bfloat16",
        "bytes_per_token": bytes_per_token(k, vocab),
        "source": source,
        "tensors": {n: {"dtype": _ST_NAMES[x.dtype], "shape": list(x.shape)} for n, x in tensors.items()},
    }
    return write_sealed_safetensors(path, tensors, manifest, format_name=FORMAT_NAME,
                                    manifest_key=MANIFEST_KEY)


# --------------------------------------------------------------------------- load


class TeacherCache:
    """A loaded teacher cache: ``cache[i]`` / iteration give ``(indices, logprobs)`` per batch
    (shapes ``batch_shape + (k,)``, int64 and float32 by default); :meth:`rows` slices tokens."""

    def __init__(self, path: str, manifest: dict, indices: Tensor, logprobs: Tensor) -> None:
        self.path = path
        self.manifest = manifest
        self.vocab_size: int = manifest["vocab_size"]
        self.k: int = manifest["k"]
        self.temperature: float = manifest["temperature"]
        self.num_tokens: int = manifest["num_tokens"]
        self.source: str = manifest["source"]
        self.batch_shapes: list[tuple[int, ...]] = [tuple(s) for s in manifest["batch_shapes"]]
        self.bytes_per_token: int = manifest["bytes_per_token"]
        self.indices = indices  # (N, k) int64, unpacked
        self.logprobs = logprobs  # (N, k) bfloat16, as stored
        sizes = [math.prod(s) for s in self.batch_shapes]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)

    def __len__(self) -> int:
        return len(self.batch_shapes)

    def rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Tokens ``start:stop`` (over all batches, in order): ``(indices (n, k), logprobs (n, k))``."""
        return self.indices[start:stop], self.logprobs[start:stop].to(dtype)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: batch {i} out of range ({n} batches)")
        i %= n
        lo, hi = self.offsets[i], self.offsets[i + 1]
        shape = self.batch_shapes[i] + (self.k,)
        idx, lp = self.rows(lo, hi)
        return idx.reshape(shape), lp.reshape(shape)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def summary(self) -> str:
        dense = 2 * self.vocab_size
        return (
            f"{self.path}: {self.num_tokens} tokens in {len(self)} batches, V = {self.vocab_size}, "
            f"k = {self.k}, T = {self.temperature:g}; {self.bytes_per_token} bytes/token "
            f"(bf16 log-probs + {self.manifest['index_bytes']}-byte ids; dense bf16 logits: "
            f"{dense} bytes/token, {dense / self.bytes_per_token:.0f}x more)"
        )


def teacher_cache_report(path: PathLike, *, print_it: bool = True) -> dict:
    """Load and check a cache; print (and return) its size figures, bytes per token included."""
    cache = load_teacher_cache(path)
    size = os.path.getsize(os.fspath(path))
    info = {
        "path": os.fspath(path),
        "num_tokens": cache.num_tokens,
        "vocab_size": cache.vocab_size,
        "k": cache.k,
        "bytes_per_token": cache.bytes_per_token,
        "file_bytes_per_token": size / max(cache.num_tokens, 1),
        "dense_bf16_bytes_per_token": 2 * cache.vocab_size,
    }
    if print_it:
        print(cache.summary() + f"; file: {size} bytes, {info['file_bytes_per_token']:.1f} bytes/token with the header")
    return info


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _check_manifest(m: Any, where: str) -> dict:
    check_sealed_manifest(m, where, format_name=FORMAT_NAME, format_version=FORMAT_VERSION)
    v, k, n = m.get("vocab_size"), m.get("k"), m.get("num_tokens")
    if not _is_int(v, 1):
        raise ValueError(f"{where}: manifest vocab_size must be an integer >= 1, got {v!r}")
    if not _is_int(k, 1) or k > v:
        raise ValueError(f"{where}: manifest k must be an integer in [1, vocab_size = {v}], got {k!r}")
    if not _is_int(n, 0):
        raise ValueError(f"{where}: manifest num_tokens must be an integer >= 0, got {n!r}")
    t = m.get("temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < math.inf):
        raise ValueError(f"{where}: manifest temperature must be a finite number > 0, got {t!r}")
    shapes = m.get("batch_shapes")
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and all(_is_int(d) for d in s) for s in shapes
    ):
        raise ValueError(f"{where}: manifest batch_shapes must be a list of lists of integers")
    if sum(math.prod(s) for s in shapes) != n:
        raise ValueError(f"{where}: manifest batch_shapes cover {sum(math.prod(s) for s in shapes)} tokens, "
                         f"num_tokens says {n}")
    nb = m.get("index_bytes")
    if nb != index_bytes_for_vocab(v) or isinstance(nb, bool):
        raise ValueError(f"{where}: manifest index_bytes is {nb!r}, expected {index_bytes_for_vocab(v)} for V = {v}")
    if m.get("logprob_dtype") != "bfloat16":
        raise ValueError(f"{where}: manifest logprob_dtype is {m.get('logprob_dtype')!r}, expected 'bfloat16'")
    if m.get("bytes_per_token") != bytes_per_token(k, v):
        raise ValueError(f"{where}: manifest bytes_per_token is {m.get('bytes_per_token')!r}, "
                         f"expected {bytes_per_token(k, v)}")
    if not isinstance(m.get("source"), str):
        raise ValueError(f"{where}: manifest source must be a string")
    expected = {"indices": {"dtype": "uint8", "shape": [n, k, nb]},
                "logprobs": {"dtype": "bfloat16", "shape": [n, k]}}
    if m.get("tensors") != expected:
        raise ValueError(f"{where}: manifest tensors are {m.get('tensors')!r}, expected {expected!r}")
    return m


def load_teacher_cache(path: PathLike) -> TeacherCache:
    """Load and fully check a cache written by :func:`build_teacher_cache` (ValueError naming
    the file on any inconsistency)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from kdengine.serialize import _parse_header

    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read the teacher cache: {exc}") from exc
    header, _ = _parse_header(data, where)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or MANIFEST_KEY not in meta:
        raise ValueError(f"{where}: not a kdengine teacher cache (no {MANIFEST_KEY!r} in the safetensors metadata)")
    if set(meta) != {"format", MANIFEST_KEY} or meta["format"] != FORMAT_NAME:
        raise ValueError(f"{where}: unexpected safetensors metadata keys {sorted(meta)} (file altered?)")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: the manifest is not valid JSON: {exc}") from None
    manifest = _check_manifest(manifest, where)
    names = {n: info.get("dtype") if isinstance(info, dict) else None
             for n, info in header.items() if n != "__metadata__"}
    if names != _EXPECTED_ST:
        raise ValueError(f"{where}: the file holds tensors {names}, expected {_EXPECTED_ST}")
    try:
        tensors = st_load(data)
    except SafetensorError as exc:
        raise ValueError(f"{where}: not a readable safetensors file: {exc}") from None
    for name, info in manifest["tensors"].items():
        x = tensors[name]
        if _ST_NAMES.get(x.dtype) != info["dtype"] or list(x.shape) != info["shape"]:
            raise ValueError(
                f"{where}: tensor {name!r} is {x.dtype} {list(x.shape)}, the manifest says {info}"
            )
    if payload_sha256(tensors) != manifest["payload_sha256"]:
        raise ValueError(f"{where}: tensor payload hash mismatch: the tensor data was altered or corrupted")
    idx = unpack_indices(tensors["indices"])
    v = manifest["vocab_size"]
    if idx.numel() and int(idx.max()) >= v:
        raise ValueError(f"{where}: indices out of [0, {v}): found {int(idx.max())}")
    lp = tensors["logprobs"]
    if lp.numel():
        if bool(torch.isnan(lp).any()):
            raise ValueError(f"{where}: logprobs contain NaN")
        if bool((lp > 0).any()):
            raise ValueError(f"{where}: logprobs must be <= 0, found {float(lp.max())}")
    return TeacherCache(where, manifest, idx, lp)
