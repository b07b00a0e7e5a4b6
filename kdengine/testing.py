"""Test knobs of the kernels. Not public API: names and behaviour may change without notice.

Each knob forces a code path that the kernels would otherwise pick from the sizes or the CPU, so
that the tests reach every path on any machine. The knobs are process-wide (every thread sees a
change at its next call), and each one is a context manager that restores the previous setting.

* :func:`binary_isa` forces the instruction set of the C++ binary kernels (portable, POPCNT, AVX2,
  AVX-512 VPOPCNTDQ); :func:`float_isa` that of the C++ float kernels (kd_loss, topk_kd and
  if_multistep: portable, AVX2+FMA, AVX-512). :func:`binary_isas` / :func:`float_isas` list the
  levels this CPU has, for parametrizing tests over every path. Forcing a level the CPU lacks
  raises ValueError. Without a forced level the kernels take the best one of the CPU, or the
  portable code everywhere while ``KDENGINE_CPU_PORTABLE`` is set (to anything but "" or "0").
* :func:`binary_lut_min` / :func:`binary_split_b_rows` move the size thresholds of the AVX2 GEMM
  paths (table lookup; packed B panels).
* :func:`triton_kd_block` forces the chunk width of the Triton kd_loss kernel.
* :func:`parallel_probe` records which threads ran each index of ``kdengine::parallel_for``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from kdengine import _cpu_isa

__all__ = [
    "ISA_PORTABLE",
    "ISA_POPCNT",
    "ISA_AVX2",
    "ISA_AVX512",
    "ISA_NAMES",
    "binary_isa",
    "binary_isas",
    "float_isa",
    "float_isas",
    "isa_in_use",
    "binary_lut_min",
    "binary_split_b_rows",
    "triton_kd_block",
    "parallel_probe",
]

ISA_PORTABLE, ISA_POPCNT, ISA_AVX2, ISA_AVX512 = 0, 1, 2, 3
ISA_NAMES = {ISA_PORTABLE: "portable", ISA_POPCNT: "popcnt", ISA_AVX2: "avx2", ISA_AVX512: "avx512"}


def _cpu():
    from kdengine import _native

    return _native.cpu_utils()


@contextlib.contextmanager
def _setting(setter, *value) -> Iterator[None]:
    """``setter(*value)`` for the block, then the previous setting (``setter`` returns it)."""
    old = setter(*value)
    try:
        yield
    finally:
        if isinstance(old, tuple):
            setter(*old)
        else:
            setter(old)


def set_binary_isa(isa: int) -> int:
    """Run the C++ binary kernels with ``isa`` (0 portable, 1 POPCNT, 2 AVX2, 3 AVX-512
    VPOPCNTDQ; -1 automatic); returns the previous setting. Raises ValueError when this CPU lacks
    the instruction set."""
    return int(_cpu().binary_force_isa(isa))


def binary_isa(isa: int) -> contextlib.AbstractContextManager:
    return _setting(set_binary_isa, isa)


def set_float_isa(isa: int) -> int:
    """Run the C++ float kernels (kd_loss, topk_kd, if_multistep, lif_multistep) with ``isa`` (0 portable,
    2 AVX2+FMA, 3 AVX-512; -1 automatic); returns the previous setting. Raises ValueError when
    this CPU lacks the instruction set (and for 1: these kernels have no POPCNT build)."""
    return int(_cpu().cpu_force_isa(_cpu_isa.FAMILIES["float"], isa))


def float_isa(isa: int) -> contextlib.AbstractContextManager:
    return _setting(set_float_isa, isa)


def binary_isas() -> list[int]:
    """The levels of the binary kernels this CPU can run, in increasing order."""
    return _cpu_isa.isas("binary")


def float_isas() -> list[int]:
    """The levels of the float kernels this CPU can run, in increasing order."""
    return _cpu_isa.isas("float")


isa_in_use = _cpu_isa.isa_in_use


def set_binary_lut_min(rows: int, cols: int) -> tuple[int, int]:
    """Smallest M and N for the AVX2 table-lookup GEMM; returns the previous pair."""
    old = _cpu().binary_set_lut_min(rows, cols)
    return int(old[0]), int(old[1])


def set_binary_split_b_rows(rows: int) -> int:
    """M from which the AVX2 GEMM packs B into panels too; returns the previous threshold."""
    return int(_cpu().binary_set_split_b_rows(rows))


def binary_lut_min(rows: int, cols: int) -> contextlib.AbstractContextManager:
    return _setting(set_binary_lut_min, rows, cols)


def binary_split_b_rows(rows: int) -> contextlib.AbstractContextManager:
    return _setting(set_binary_split_b_rows, rows)


@contextlib.contextmanager
def triton_kd_block(block: Optional[int]) -> Iterator[None]:
    """Force the Triton kd_loss chunk width (a power of two; None: back to the heuristic / the
    ``KDENGINE_TRITON_KD_BLOCK`` environment variable)."""
    from kdengine.ops.kd_loss import triton_kernel

    old = triton_kernel._FORCE_BLOCK
    triton_kernel._FORCE_BLOCK = block
    try:
        yield
    finally:
        triton_kernel._FORCE_BLOCK = old


def parallel_probe(n: int, grain: int, dynamic: bool = False) -> torch.Tensor:
    """``(n,)`` int64: for each index of one ``kdengine::parallel_for(0, n, grain)``
    (``dynamic``: ``parallel_for_dynamic``, whose grain is the chunk), the distinct OS thread that
    ran it, numbered 0, 1, ... in order of first appearance."""
    return _cpu().parallel_probe(n, grain, dynamic)
