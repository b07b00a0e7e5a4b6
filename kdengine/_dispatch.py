"""Backend model: which backends exist, whether each one can run here, and which one an op uses.

Every op registers one implementation per backend with :func:`register`. A call resolves its
backend in this order: the explicit ``backend=`` argument, then the ``KDENGINE_BACKEND``
environment variable, then ``"auto"`` (the fastest available backend for the tensors' device,
in the order of :data:`AUTO_ORDER`). A backend that cannot run says why, never silently: an
explicit choice raises, and ``"auto"`` passing over the fastest backend for the device warns once
per op and device with a :class:`BackendFallbackWarning` that names the reason.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "KDENGINE_BACKEND"

# Fastest first. On CUDA tensors triton is preferred over the hand-written CUDA kernels; on CPU
# tensors the C++ kernels beat everything (see benches/results/).
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` could not use the fastest backend for the device and runs a slower one
    (for example the pure-torch reference when the C++ kernels cannot be built)."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str

    def __bool__(self) -> bool:  # pragma: no cover - convenience
        return self.available


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import() -> Availability:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return Availability(False, f"triton cannot be imported: {exc}")
    return Availability(True, f"triton {triton.__version__}")


def _native_status(kind: str) -> Availability:
    from kdengine import _native

    return _native.status(kind)


def backend_availability(backend: str, device_type: str | None = None) -> Availability:
    """Can ``backend`` run, for tensors on ``device_type`` (``None``: on any device)?"""
    if backend == "reference":
        return Availability(True, "pure torch, always available")
    if backend == "cpu":
        if device_type not in (None, "cpu"):
            return Availability(False, f"the cpu backend runs on CPU tensors, not {device_type}")
        return _native_status("cpu")
    if backend == "triton":
        imp = _triton_import()
        if not imp.available:
            return imp
        if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
            if triton_interpret():
                return Availability(True, f"{imp.reason}, interpreter (TRITON_INTERPRET=1) on CPU")
            return Availability(
                False, "no CUDA GPU; triton runs on CPU only with TRITON_INTERPRET=1 (tests)"
            )
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA GPU visible to torch")
        return Availability(True, f"{imp.reason} on {torch.cuda.get_device_name()}")
    if backend == "cuda":
        if device_type not in (None, "cuda"):
            return Availability(False, f"the cuda backend runs on CUDA tensors, not {device_type}")
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA GPU visible to torch")
        return _native_status("cuda")
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")


# op name -> backend name -> implementation
_REGISTRY: dict[str, dict[str, Callable]] = {}
# (op, backend) -> names of the native ops (torch.ops.kdengine.*) whose <backend> kernel it calls
_NATIVE_OPS: dict[tuple[str, str], tuple[str, ...]] = {}


def register(op: str, backend: str, native_ops: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the ``backend`` implementation of ``op``; ``native_ops`` names the
    library ops it needs, so a native library that lacks them is reported unavailable."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = fn
        _RESOLVED.clear()
        if native_ops:
            _NATIVE_OPS[(op, backend)] = tuple(native_ops)
        return fn

    return deco


def op_availability(op: str, backend: str, device_type: str | None = None) -> Availability:
    """:func:`backend_availability`, and for native backends also: does the built library have
    the native ops this op's implementation calls?"""
    avail = backend_availability(backend, device_type)
    needed = _NATIVE_OPS.get((op, backend), ())
    if not avail.available or not needed:
        return avail
    from kdengine import _native

    missing = [n for n in needed if not _native.has_op(backend, n)]
    if missing:
        return Availability(False, f"the {backend} library has no {backend} kernel for "
                                   f"{', '.join(missing)} (no kernel source for {op!r} in csrc)")
    return avail


def implementation(op: str, backend: str) -> Callable:
    return _REGISTRY[op][backend]


def ops() -> list[str]:
    return sorted(_REGISTRY)


@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """Pick the backend for ``op`` on ``device``; raise a clear error if the choice cannot run.

    Under torch.compile the answer is a trace-time constant: the availability probe takes a lock
    and may build the native library, neither of which Dynamo can (or should) trace.
    """
    return _resolve(op, device, backend)


# (op, device type, backend argument, KDENGINE_BACKEND) -> resolved backend. Availability cannot
# change within a process once probed (libraries load once, devices stay), so a successful answer
# is kept; errors are recomputed (and raised) each time. register() clears it.
_RESOLVED: dict[tuple[str, str, str | None, str], str] = {}


def _resolve(op: str, device: torch.device, backend: str | None) -> str:
    key = (op, device.type, backend, os.environ.get(ENV_VAR, ""))
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _RESOLVED[key] = _resolve_uncached(op, device, backend)
    return hit


def _resolve_uncached(op: str, device: torch.device, backend: str | None) -> str:
    requested = backend
    source = "backend argument"
    if requested is None or requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto" and requested is None:
            requested, source = env, f"{ENV_VAR} environment variable"
        else:
            requested = "auto"
    impls = _REGISTRY.get(op, {})
    if requested == "auto":
        passed_over: list[tuple[str, str]] = []
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if name not in impls:
                continue
            avail = op_availability(op, name, device.type)
            if avail.available:
                _warn_fallback(op, device.type, passed_over, name)
                return name
            passed_over.append((name, avail.reason))
        _warn_fallback(op, device.type, passed_over, "reference")
        return "reference"
    if requested not in BACKENDS:
        raise ValueError(
            f"backend (from the {source}) must be one of {BACKENDS} or 'auto', got {requested!r}"
        )
    if requested not in impls:
        raise ValueError(f"op {op!r} has no {requested!r} backend; it has {sorted(impls)}")
    avail = op_availability(op, requested, device.type)
    if not avail.available:
        raise RuntimeError(
            f"backend {requested!r} (from the {source}) cannot run {op!r} on {device.type} "
            f"tensors: {avail.reason}"
        )
    return requested


_WARNED: set[tuple[str, str, str]] = set()
_WARNED_LOCK = threading.Lock()
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _warn_fallback(op: str, device_type: str, passed_over: list[tuple[str, str]], chosen: str) -> None:
    """Warn once per (op, device, chosen backend) that ``auto`` passed over faster backends."""
    if not passed_over or chosen == passed_over[0][0]:
        return
    key = (op, device_type, chosen)
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    fastest, why = passed_over[0]
    warnings.warn(
        f"kdengine: {op} on {device_type} tensors runs on the {chosen!r} backend, not the faster "
        f"{fastest!r} one: {why}. Run `kdengine doctor` for details; pass backend={chosen!r} (or "
        f"set {ENV_VAR}={chosen}) to choose it explicitly and silence this warning.",
        BackendFallbackWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside the kdengine package (the user's call)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def backends() -> dict[str, dict[str, dict[str, object]]]:
    """For each op and backend: ``{"available": bool, "reason": str}`` (for any device here)."""
    _load_ops()
    out: dict[str, dict[str, dict[str, object]]] = {}
    for op in ops():
        out[op] = {}
        for name in BACKENDS:
            if name not in _REGISTRY[op]:
                out[op][name] = {"available": False, "reason": "not implemented for this op"}
                continue
            a = op_availability(op, name, None)
            out[op][name] = {"available": a.available, "reason": a.reason}
    return out


def _load_ops() -> None:
    import kdengine.ops  # noqa: F401  (registers every op's backends)
