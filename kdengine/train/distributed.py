"""torch.distributed helpers for the :class:`~kdengine.train.Distiller` (DDP, gloo on CPU, nccl on GPU).

The trainer works the same under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) and under :func:`spawn` (torch.multiprocessing, used by the
tests). Data sharding is deterministic: every rank draws the *same* seeded global permutation of the
training set for an epoch, cuts it into the same global batches, and takes its own slice of each
global batch (:func:`shard_batch`). So N processes with per-rank batch B/N see exactly the examples
one process sees with batch B, and DDP's gradient average reproduces the single-process gradient
(up to float summation order) once each rank's loss is weighted by its share of the global batch
(:func:`shard_weight`).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group is initialised and has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the process that writes files and prints."""
    return rank() == 0


def default_backend(device: torch.device | str | None = None) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return "nccl" if dev.type == "cuda" else "gloo"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_distributed(
    backend: Optional[str] = None,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    master_addr: Optional[str] = None,
    master_port: Optional[int] = None,
    device: torch.device | str | None = None,
    timeout_s: float = 120.0,
) -> bool:
    """Initialise the default process group from arguments or the torchrun environment.

    Returns True when a group was created (or already existed), False when the environment asks for
    a single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1`` and no arguments). On CUDA, each process
    is pinned to ``LOCAL_RANK`` (or its rank modulo the device count).
    """
    if dist.is_initialized():
        return True
    ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    rk = rank if rank is not None else int(os.environ.get("RANK", "0"))
    if ws < 1 or not (0 <= rk < ws):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rk} world_size={ws}")
    if ws == 1 and world_size is None:
        return False
    os.environ["MASTER_ADDR"] = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    if master_port is not None:
        os.environ["MASTER_PORT"] = str(master_port)
    if "MASTER_PORT" not in os.environ:
        raise ValueError("master_port is required (or set MASTER_PORT) to start a process group")
    be = backend or default_backend(device)
    if be == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rk % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local)
    dist.init_process_group(be, rank=rk, world_size=ws, timeout=timedelta(seconds=timeout_s))
    return True


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """dist.barrier() when distributed, else nothing."""
    if is_distributed():
        dist.barrier()


def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """Start/stop of rank ``rank_``'s contiguous slice of a global batch of ``n`` examples.

    Slices differ by at most one example; with ``n % world == 0`` every rank gets ``n / world``.
    """
    if world < 1 or not (0 <= rank_ < world):
        raise ValueError(f"need 0 <= rank < world, got rank={rank_} world={world}")
    return (rank_ * n) // world, ((rank_ + 1) * n) // world


def shard_batch(indices: Tensor, rank_: Optional[int] = None, world: Optional[int] = None) -> Tensor:
    """This rank's slice of a global batch of dataset indices ``(n,) int64``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    lo, hi = shard_bounds(int(indices.numel()), r, w)
    return indices[lo:hi]


def shard_weight(n_global: int, n_local: int, world: Optional[int] = None) -> float:
    """Factor on a rank's per-example-mean loss so that DDP's gradient average equals the gradient
    of the mean over the whole global batch: ``n_local * world / n_global`` (1 for equal shards)."""
    w = world_size() if world is None else world
    return n_local * w / n_global


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (a copy; ``x`` itself unchanged); identity when not distributed."""
    if not is_distributed():
        return x.clone()
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable-free-of-tensors Python object from ``src`` to every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _spawn_entry(local_rank: int, fn: Callable[..., Any], world: int, port: int, backend: str,
                 args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(backend, rank=local_rank, world_size=world, master_port=port)
    try:
        fn(local_rank, world, *args)
    finally:
        cleanup()


def spawn(fn: Callable[..., Any], world_size_: int, *args: Any, backend: str = "gloo",
          port: Optional[int] = None) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size_`` fresh processes with a process group.

    ``fn`` must be importable (a module-level function). Uses 127.0.0.1 and a free port. Raises if
    any process fails (torch.multiprocessing's ProcessRaisedException names the rank).
    """
    import torch.multiprocessing as mp

    if world_size_ < 1:
        raise ValueError(f"world_size_ must be >= 1, got {world_size_}")
    p = find_free_port() if port is None else port
    mp.spawn(_spawn_entry, args=(fn, world_size_, p, backend, args), nprocs=world_size_, join=True)
