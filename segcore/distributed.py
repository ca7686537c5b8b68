"""torchrun support shared by every command that shards work across processes (evaluate, compare, predict).

Outside torchrun every function answers as a single process, so callers need no special case.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["gather_objects", "init_distributed", "rank_and_world"]


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
