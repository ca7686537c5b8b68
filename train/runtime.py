"""Where and how a training run executes: device and torchrun process group, rank-0 statistics for the
head's BatchNorm, SIGINT/SIGTERM handling and the RNG state a resumed run restores."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from segcore.distributed import init_distributed

from .errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started: bool = False
    """This process started the process group (so it ends it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_runtime(device_pref: str) -> tuple[DistInfo, torch.device]:
    """The process group (through :func:`segcore.distributed.init_distributed`) and this rank's device:
    ``auto`` or ``cuda`` is ``cuda:LOCAL_RANK`` where CUDA is available."""
    rank, world, started = init_distributed(device_pref)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_pref == "auto":
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_pref)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local, started), device


def end_runtime(info: DistInfo) -> None:
    if info.started and dist.is_initialized():
        dist.destroy_process_group()


def share_head_statistics(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's running statistics of the head's BatchNorm to every process.

    Each process updates its own from its own batch; without this the ranks would validate with
    different statistics than the checkpoint (rank 0's) holds.
    """
    if info.enabled:
        for buffer in model.base.aspp.buffers():
            dist.broadcast(buffer, 0)


def sync_head_bn(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """The head's BatchNorm as SyncBatchNorm for ``model.sync_bn`` under DDP (the backbone's stays frozen)."""
    if not info.enabled:
        return model
    if device.type != "cuda":
        raise ConfigError("model.sync_bn: PyTorch's SyncBatchNorm runs on CUDA devices only; on CPU processes "
                          "set model.sync_bn: false (each process then normalises its own batch)")
    model.base.aspp = nn.SyncBatchNorm.convert_sync_batchnorm(model.base.aspp)
    return model


class StopFlag:
    """SIGINT/SIGTERM -> finish the current step, save last.pth, exit. A second SIGINT stops at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def install(self):
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving "
              "checkpoints/last.pth "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": {"version": int(version), "state": torch.tensor(state, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
