"""Checkpoints without pickle: one safetensors file, tensors plus a JSON state in its header.

Layout of a checkpoint file (``*.safetensors``):

* tensors ``module/<name>/<param or buffer>`` for every nn.Module component;
* tensors ``optim/<name>/<param index>/<key>`` for every tensor in an optimizer's per-parameter
  state (Adam's ``exp_avg``, ``step``...), the rest of ``optimizer.state_dict()`` (param groups,
  non-tensor state) goes to the JSON;
* tensors ``rng/torch`` (CPU generator state, uint8) and ``rng/cuda/<i>``;
* header metadata key ``kdengine`` = JSON: format version, user state (epoch, step, metrics...),
  scheduler state dicts, optimizer skeletons.

Integrity: the JSON carries ``payload_sha256`` (sha256 over the tensors in sorted name order, each
``name \0 dtype \0 shape-as-JSON \0 raw bytes``, as :mod:`kdengine.serialize` hashes a model)
and ``meta_sha256`` (sha256 of the JSON without the two hash fields, canonical: sorted keys, no
spaces). :func:`read_checkpoint` verifies both, so a flipped byte in a weight or an edited
``global_step`` is a ValueError naming the file, as is a truncated or unreadable file.
Checkpoints written before the hashes existed load with a warning (nothing to verify).

Writes are atomic: the bytes go to a temporary file ``.<name>.tmp-XXXX`` in the same directory,
are fsync'ed, and ``os.replace`` moves them over the target, so a crash leaves either the old or
the new checkpoint, never a torn one; temp files that a killed save left behind are removed by
the next save of the same file. The file gets the usual mode (``0o666 & ~umask``). Loading never
unpickles anything.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from kdengine._integrity import json_sha256, payload_sha256

FORMAT = "kdengine-checkpoint/1"
_META_KEY = "kdengine"


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def _remove_stale_temps(path: Path) -> None:
    """Remove temp files of ``path`` left by a killed save: ``.<name>.tmp-*`` (and the
    ``.<name>.XXXXXXXX.tmp`` names of earlier versions), in the same directory only."""
    d, name = str(path.parent), glob.escape(path.name)
    for pattern in (f".{name}.tmp-*", f".{name}.{'[!.]' * 8}.tmp"):
        for stale in glob.glob(os.path.join(glob.escape(d), pattern)):
            try:
                if stat.S_ISREG(os.lstat(stale).st_mode):
                    os.unlink(stale)
            except OSError:
                pass


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory for the caller to write; on success fsync it
    and ``os.replace`` it onto ``path``, on an exception remove it.

    A reader (or a crash) thus sees the old file or the whole new one, never a partial one. The
    temp name is ``.<name>.tmp-XXXX<suffix>`` (the suffix kept so that writers choosing a format by
    extension, e.g. matplotlib's ``savefig``, still do); temp files of ``path`` left by an earlier
    killed write are removed first; the file gets mode ``0o666 & ~umask`` (not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(obj: Any, where: str) -> Any:
    """Check that obj round-trips through JSON (floats inf/nan are kept as strings)."""
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, where) for v in obj]
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str or int; cannot store it as JSON")
            out[str(k)] = _json_safe(v, f"{where}.{k}")
        return out
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return {"__scalar_tensor__": obj.item(), "dtype": str(obj.dtype).removeprefix("torch.")}
    raise TypeError(
        f"{where}: {type(obj).__name__} cannot be stored as JSON in a checkpoint; keep scheduler "
        "and user state to numbers, strings, lists and dicts (lambdas in LambdaLR are not saved)"
    )


def _json_restore(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_json_restore(v) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        if set(obj) == {"__scalar_tensor__", "dtype"}:
            return torch.tensor(obj["__scalar_tensor__"], dtype=getattr(torch, obj["dtype"]))
        return {k: _json_restore(v) for k, v in obj.items()}
    return obj


def _payload_sha256(tensors: Mapping[str, Tensor]) -> str:
    return payload_sha256(tensors)

def _meta_sha256(meta: Mapping[str, Any]) -> str:
    return json_sha256(meta, ("payload_sha256", "meta_sha256"), allow_nan=True)

def _flatten_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> dict:
    sd = opt.state_dict()
    skeleton: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        entry: dict[str, Any] = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim/{name}/{idx}/{k}"] = v.detach().cpu().contiguous().clone()
                entry[k] = {"__tensor__": True}
            else:
                entry[k] = _json_safe(v, f"optimizer {name} state {idx}.{k}")
        skeleton[str(idx)] = entry
    return {"state": skeleton, "param_groups": _json_safe(sd["param_groups"], f"optimizer {name}")}


def _unflatten_optimizer(name: str, skel: dict, tensors: Mapping[str, Tensor]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in skel["state"].items():
        st = {}
        for k, v in entry.items():
            if isinstance(v, dict) and v.get("__tensor__"):
                st[k] = tensors[f"optim/{name}/{idx}/{k}"]
            else:
                st[k] = _json_restore(v)
        state[int(idx)] = st
    return {"state": state, "param_groups": _json_restore(skel["param_groups"])}


def rng_state() -> dict[str, Tensor]:
    """The torch CPU (and CUDA, if initialised) generator states as uint8 tensors."""
    out = {"rng/torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda/{i}"] = s.clone()
    return out


def set_rng_state(tensors: Mapping[str, Tensor]) -> None:
    """Restore generator states saved by :func:`rng_state` (missing CUDA entries are skipped)."""
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"].to(torch.uint8))
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([c.to(torch.uint8) for c in cuda])


def save_checkpoint(
    path: str | os.PathLike,
    *,
    modules: Optional[Mapping[str, nn.Module]] = None,
    optimizers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
    schedulers: Optional[Mapping[str, Any]] = None,
    state: Optional[Mapping[str, Any]] = None,
    save_rng: bool = True,
) -> Path:
    """Save modules, optimizers, LR schedulers, RNG and a JSON ``state`` to one file, atomically.

    Args:
        path: target file (conventionally ``*.safetensors``).
        modules: name -> nn.Module; its ``state_dict()`` tensors are stored (moved to CPU).
        optimizers: name -> optimizer; tensor state as tensors, the rest as JSON.
        schedulers: name -> object with ``state_dict()`` returning JSON-able values.
        state: JSON-able user state (epoch, step, metric history...).
        save_rng: also store the torch CPU/CUDA generator states.
    """
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"format": FORMAT, "modules": [], "optimizers": {}, "schedulers": {}}
    for name, mod in (modules or {}).items():
        if "/" in name:
            raise ValueError(f"module name {name!r} must not contain '/'")
        for k, v in mod.state_dict().items():
            tensors[f"module/{name}/{k}"] = v.detach().cpu().contiguous().clone()
        meta["modules"].append(name)
    for name, opt in (optimizers or {}).items():
        meta["optimizers"][name] = _flatten_optimizer(name, opt, tensors)
    for name, sch in (schedulers or {}).items():
        meta["schedulers"][name] = _json_safe(sch.state_dict(), f"scheduler {name}")
    meta["state"] = _json_safe(dict(state or {}), "state")
    if save_rng:
        tensors.update(rng_state())
    meta["payload_sha256"] = _payload_sha256(tensors)
    meta["meta_sha256"] = _meta_sha256(meta)
    data = st_save(tensors, metadata={_META_KEY: json.dumps(meta)})
    atomic_write_bytes(path, data)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint file, with no object construction and no pickle.

    Verifies the hashes of the tensors and of the JSON; every problem (truncated, altered,
    not a checkpoint, not a regular file) is a ValueError naming the file (FileNotFoundError if
    it does not exist). A checkpoint without hashes (written by an earlier kdengine) is loaded
    with a warning.
    """
    from safetensors import SafetensorError

    path = Path(path)
    where = repr(str(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {where} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"checkpoint {where} is not a regular file")
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"checkpoint {where} is truncated or not a safetensors file: {exc}") from None
    if _META_KEY not in header:
        raise ValueError(f"{where} is not a kdengine checkpoint (no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(header[_META_KEY])
    except (RecursionError, ValueError) as exc:
        raise ValueError(f"checkpoint {where}: the '{_META_KEY}' metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint {where}: the '{_META_KEY}' metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{where}: unknown checkpoint format {meta.get('format')!r}")
    if "payload_sha256" not in meta and "meta_sha256" not in meta:
        warnings.warn(
            f"checkpoint {where} has no integrity hashes (written by an older kdengine); loading it "
            "unverified. Save it again to add them.",
            stacklevel=3,
        )
    else:
        if not isinstance(meta.get("meta_sha256"), str) or _meta_sha256(meta) != meta["meta_sha256"]:
            raise ValueError(
                f"checkpoint {where}: metadata hash mismatch: the JSON state (step, optimizer "
                "settings...) was altered or corrupted"
            )
        if not isinstance(meta.get("payload_sha256"), str) or _payload_sha256(tensors) != meta["payload_sha256"]:
            raise ValueError(f"checkpoint {where}: tensor hash mismatch: the tensor data was altered or corrupted")
    return tensors, meta


def load_checkpoint(
    path: str | os.PathLike,
    *,
    modules: Optional[Mapping[str, nn.Module]] = None,
    optimizers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
    schedulers: Optional[Mapping[str, Any]] = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into the given objects; returns the user state.

    Module tensors are copied into the existing parameters (keeping their device and dtype).
    ``strict``: every given module/optimizer/scheduler must be present in the file.
    """
    tensors, meta = read_checkpoint(path)
    where = repr(str(path))
    for name, mod in (modules or {}).items():
        if name not in meta["modules"]:
            if strict:
                raise KeyError(f"checkpoint {where} has no module {name!r} (has {meta['modules']})")
            continue
        prefix = f"module/{name}/"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            mod.load_state_dict(sd, strict=strict)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {where}: module {name!r} does not match it: {exc}") from None
    for name, opt in (optimizers or {}).items():
        if name not in meta["optimizers"]:
            if strict:
                raise KeyError(f"checkpoint {where} has no optimizer {name!r}")
            continue
        opt.load_state_dict(_unflatten_optimizer(name, meta["optimizers"][name], tensors))
    for name, sch in (schedulers or {}).items():
        if name not in meta["schedulers"]:
            if strict:
                raise KeyError(f"checkpoint {where} has no scheduler {name!r}")
            continue
        sch.load_state_dict(_json_restore(meta["schedulers"][name]))
    if restore_rng:
        set_rng_state(tensors)
    return _json_restore(meta["state"])
