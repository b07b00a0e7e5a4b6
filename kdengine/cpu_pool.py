"""The CPU output reuse pool of the native kernels (kdengine/csrc/common/output_pool.h).

Large outputs of the C++ spiking kernels (>= 8 MB: spikes, input gradients) come from a pool that
keeps freed buffers and hands them out again for a request of the same size, so a repeated call
does not pay the operating system's page faults and page zeroing on fresh memory (on a 2-core VM:
~7 ms for 64 MB with transparent huge pages, ~30 ms without, against ~9 ms for the IF forward
itself). At most ``limit`` bytes of *free* buffers are kept (default 1 GiB; the environment
variable ``KDENGINE_CPU_POOL_MB`` sets it at start-up, 0 disables the pool).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PoolStats", "stats", "clear", "set_limit"]


@dataclass(frozen=True)
class PoolStats:
    held_bytes: int  # free bytes cached, ready for reuse
    blocks: int  # free blocks cached
    hits: int  # allocations served from the pool
    misses: int  # pooled-size allocations that had to map fresh memory
    limit_bytes: int  # most free bytes kept


def _ops():
    from kdengine import _native

    return _native.cpu_utils()


def stats() -> PoolStats:
    """Current pool state (raises :class:`kdengine._native.NativeBuildError` without the C++ library)."""
    return PoolStats(*(int(v) for v in _ops().cpu_pool_stats()))


def clear() -> int:
    """Free every cached buffer now; returns the bytes given back to the OS."""
    return int(_ops().cpu_pool_clear())


def set_limit(limit_bytes: int) -> int:
    """Keep at most ``limit_bytes`` of free buffers (0 disables pooling and frees the cache);
    returns the previous limit."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    return int(_ops().cpu_pool_set_limit(limit_bytes))
