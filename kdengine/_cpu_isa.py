"""Which instruction-set path the C++ CPU kernels take (csrc/common/cpu_isa.h), for reports.

Two families of kernels choose separately: ``"binary"`` (XNOR / AND popcount GEMM and bit packing:
portable, popcnt, avx2, avx512-vpopcntdq) and ``"float"`` (kd_loss, topk_kd, if_multistep:
portable, avx2-fma, avx512). The test knobs that force a path live in :mod:`kdengine.testing`.
"""
from __future__ import annotations

FAMILIES = {"binary": 0, "float": 1}  # csrc/common/cpu_isa.h's IsaFamily
LEVELS = (0, 1, 2, 3)  # portable, popcnt, avx2, avx512


def _cpu():
    from kdengine import _native

    return _native.cpu_utils()


def isa_in_use(family: str) -> tuple[int, str]:
    """``(level, name)`` the ``family`` kernels run now, e.g. ``(3, "avx512-vpopcntdq")``: the
    forced level, the portable one while ``KDENGINE_CPU_PORTABLE`` is set, or the CPU's best."""
    cpu = _cpu()
    fam = FAMILIES[family]
    level = int(cpu.cpu_isa(fam))
    return level, str(cpu.cpu_isa_name(fam, level))


def isas(family: str) -> list[int]:
    """The levels of ``family`` this CPU can run, in increasing order."""
    cpu = _cpu()
    return [i for i in LEVELS if cpu.cpu_has_isa(FAMILIES[family], i)]


def family_of(native_ops: tuple[str, ...]) -> str | None:
    """The family of an op's CPU implementation from the library ops it calls (None: none)."""
    if not native_ops:
        return None
    return "binary" if all(n.startswith("binary_") for n in native_ops) else "float"
