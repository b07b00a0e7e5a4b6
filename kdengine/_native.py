"""Builds and loads the native kernels in ``kdengine/csrc`` (JIT, ninja, cached).

The sources live in one folder per op (``csrc/<op>/``) plus ``csrc/common/`` (headers, the output
pool, the thread-pool probe), and are split between two libraries by name: ``*.cu`` and
``*_cuda.cpp`` go into the CUDA library, every other ``*.cpp`` into the CPU library, and
``*_emul.cu`` (host emulations built by the tests) into neither. Includes are relative to ``csrc``
(``#include "common/parallel.h"``). The kernels of both libraries implement the ops of one
namespace, ``torch.ops.kdengine``, whose schemas :mod:`kdengine._schemas` defines once per process
before a library is loaded; CPU-only utilities stay in ``torch.ops.kdengine_cpu``. Adding a kernel
is adding a file (and its schema). The first use compiles (about a minute on 2 cores, announced on
stderr); later uses load the cached library (``KDENGINE_CACHE`` or ``~/.cache/kdengine``).
``kdengine build`` compiles ahead of time.

A build folder is complete once it holds the library and a ``BUILT`` record, written last: such a
folder is loaded as it is, without a lock or any other write, so a read-only cache works. Building
is guarded by :class:`kdengine._build_lock.BuildLock`, which recognises the lock of a killed build
and takes it over with a message instead of waiting forever, as torch's bare lock file would.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from kdengine._build_lock import BuildLock, BuildLockTimeout
from kdengine._dispatch import Availability

CSRC = Path(__file__).resolve().parent / "csrc"
_LOCK = threading.Lock()
_ERRORS: dict[str, str] = {}
_LOADED: set[str] = set()

CPU_CFLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]
CUDA_CFLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
CUDA_HOST_CFLAGS = ["-O3", "-std=c++17"]
BUILT_MARKER = "BUILT"


class NativeBuildError(RuntimeError):
    """The native extension could not be compiled or loaded; the message carries the log."""


def cache_dir() -> Path:
    root = os.environ.get("KDENGINE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "kdengine"
    )
    tag = f"torch{torch.__version__.replace('+', '_')}"
    return Path(root) / tag


def source_kind(path: Path) -> str | None:
    """Which library a source file belongs to: ``"cuda"``, ``"cpu"`` or None (not a source, or a
    test-only host emulation)."""
    name = path.name
    if name.endswith("_emul.cu"):
        return None
    if name.endswith((".cu", "_cuda.cpp")):
        return "cuda"
    if name.endswith(".cpp"):
        return "cpu"
    return None


def sources(kind: str) -> list[Path]:
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    return sorted(p for p in CSRC.rglob("*") if p.is_file() and source_kind(p) == kind)


def _flags(kind: str) -> dict:
    if kind == "cpu":
        return {"extra_cflags": CPU_CFLAGS}
    return {"extra_cflags": CUDA_HOST_CFLAGS, "extra_cuda_cflags": CUDA_CFLAGS}


def _digest(files: list[Path], flags: object = None) -> str:
    """Names a build by everything that goes into it: sources, headers and compiler flags (a
    complete build folder is loaded without asking ninja, so a flag change must change the name)."""
    h = hashlib.sha1()
    for f in files:
        h.update(f.relative_to(CSRC).as_posix().encode())
        h.update(f.read_bytes())
    for hdr in sorted((CSRC).rglob("*.h")) + sorted(CSRC.rglob("*.cuh")):
        h.update(hdr.read_bytes())
    if flags is not None:
        h.update(json.dumps(flags, sort_keys=True).encode())
    return h.hexdigest()[:12]


def build_paths(kind: str) -> tuple[str, Path, Path]:
    """``(name, build folder, library file)`` of the ``kind`` extension for these sources."""
    files = sources(kind)
    if not files:
        raise NativeBuildError(f"no {kind} sources under {CSRC}")
    name = f"kdengine_{kind}_{_digest(files, _flags(kind))}"
    build_dir = cache_dir() / name
    return name, build_dir, build_dir / f"{name}.so"


def _complete(build_dir: Path, library: Path) -> bool:
    return library.is_file() and (build_dir / BUILT_MARKER).is_file()


def _writable(folder: Path) -> bool:
    # access() reports a read-only file system (EROFS) even to root.
    return os.access(folder, os.W_OK)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _build(kind: str, verbose: bool = False) -> None:
    from kdengine import _schemas

    _schemas.define()  # the libraries only implement these schemas
    name, build_dir, library = build_paths(kind)
    if _complete(build_dir, library) or (library.is_file() and not _writable(build_dir)):
        # Complete, or read-only where nothing could be rebuilt anyway: load it as it is.
        torch.ops.load_library(str(library))
        return
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeBuildError(
            f"cannot create the build folder {build_dir} ({exc}); set KDENGINE_CACHE to a "
            f"writable folder"
        ) from exc
    if not _writable(build_dir):
        raise NativeBuildError(
            f"the build folder {build_dir} is read-only and holds no built library "
            f"({library.name}); set KDENGINE_CACHE to a writable folder"
        )
    from torch.utils import cpp_extension

    try:
        with BuildLock(build_dir):
            if _complete(build_dir, library):  # built by the process we waited for
                torch.ops.load_library(str(library))
                return
            what = "C++" if kind == "cpu" else "CUDA"
            _say(f"kdengine: compiling the {what} kernels into {build_dir} (once, about a "
                 f"minute{'' if kind == 'cpu' else ' or more'})")
            start = time.monotonic()
            cpp_extension.load(
                name=name,
                sources=[str(f) for f in sources(kind)],
                extra_include_paths=[str(CSRC)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
                **_flags(kind),
            )
            (build_dir / BUILT_MARKER).write_text(json.dumps(
                {"name": name, "torch": torch.__version__, "built": time.time()}))
            _say(f"kdengine: {what} kernels compiled in {time.monotonic() - start:.0f} s")
    except BuildLockTimeout as exc:
        raise NativeBuildError(str(exc)) from exc


def _prerequisite(kind: str) -> str | None:
    """Why ``kind`` cannot be built here, or None."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    if kind == "cpu":
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            return "no C++ compiler (c++) on PATH"
        return None
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc / CUDA_HOME) found"
    return None


def load(kind: str, verbose: bool = False) -> None:
    """Compile (if needed) and load the ``kind`` extension; raise :class:`NativeBuildError`."""
    with _LOCK:
        if kind in _LOADED:
            return
        if kind in _ERRORS:
            raise NativeBuildError(_ERRORS[kind])
        why = _prerequisite(kind)
        if why is not None:
            _ERRORS[kind] = why
            raise NativeBuildError(why)
        try:
            _build(kind, verbose=verbose)
        except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError
            msg = f"building the {kind} extension failed: {exc}"
            _ERRORS[kind] = msg
            raise NativeBuildError(msg) from exc
        _LOADED.add(kind)


_STATUS: dict[str, Availability] = {}
_HAS_OP: dict[tuple[str, str], bool] = {}


def status(kind: str) -> Availability:
    """Whether the ``kind`` library builds and loads here, and why not. The outcome of a load
    never changes within a process (successes and failures are both kept), so it is computed
    once: dispatch asks on every op call."""
    cached = _STATUS.get(kind)
    if cached is not None:
        return cached
    try:
        load(kind)
    except NativeBuildError as exc:
        avail = Availability(False, str(exc))
    else:
        avail = Availability(True, f"native {kind} extension built in {cache_dir()}")
    _STATUS[kind] = avail
    return avail


_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


@functools.lru_cache(maxsize=None)
def ops(kind: str):
    """``torch.ops.kdengine`` after loading the ``kind`` library (which adds its kernels)."""
    load(kind)
    return torch.ops.kdengine


@functools.lru_cache(maxsize=None)
def cpu_utils():
    """``torch.ops.kdengine_cpu``: the CPU library's utilities (output pool, binary ISA, probes)."""
    load("cpu")
    return torch.ops.kdengine_cpu


def has_op(kind: str, name: str) -> bool:
    """Has the ``kind`` library a kernel for ``torch.ops.kdengine.<name>`` (after loading it)?"""
    cached = _HAS_OP.get((kind, name))
    if cached is not None:
        return cached
    try:
        load(kind)
    except NativeBuildError:
        found = False
    else:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"kdengine::{name}",
                                                               _DISPATCH_KEY[kind])
    _HAS_OP[(kind, name)] = found
    return found
