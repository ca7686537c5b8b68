"""torchrun support shared by every command that shards work across processes (evaluate, compare, predict).

Outside torchrun every function answers as a single process, so callers need no special case.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

__all__ = ["barrier", "gather_objects", "init_distributed", "rank_and_world", "torchrun_process"]


def init_distributed(device: str = "auto") -> tuple[int, int, bool]:
    """``(rank, world_size, started)``; starts the default process group under torchrun.

    When the torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) are set and no group
    exists yet, it is started with nccl on CUDA (each rank on ``cuda:LOCAL_RANK``) or gloo on the
    CPU; ``started`` says this call started it (so the caller may destroy it).
    """
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, False
    world = int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and (device == "auto" or str(device).startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, True


@contextlib.contextmanager
def torchrun_process(device: str = "auto") -> Iterator[tuple[int, int, str]]:
    """``(rank, world_size, device)`` for a command that runs alone or under torchrun: the process group
    as :func:`init_distributed` starts it, ``auto`` turned into this rank's GPU under torchrun, and the
    group ended on the way out when this call started it."""
    rank, world, started = init_distributed(device)
    try:
        if world > 1 and device == "auto":
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{torch.cuda.current_device()}"
        yield rank, world, device
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj: Any, world: int) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` for a single process)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
