"""segcore.distributed.torchrun_process: one process group set-up and tear-down for every torchrun command."""

import socket

import pytest
import torch.distributed as dist

from segcore.distributed import torchrun_process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_outside_torchrun_it_is_one_process_without_a_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with torchrun_process("cpu") as (rank, world, device):
        assert (rank, world, device) == (0, 1, "cpu")
        assert not dist.is_initialized()


def test_under_torchrun_it_starts_the_group_and_ends_it_even_on_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(RuntimeError, match="boom"):
        with torchrun_process("cpu") as (rank, world, device):
            assert dist.is_initialized() and dist.get_backend() == "gloo"
            assert (rank, world, device) == (0, 1, "cpu")
            raise RuntimeError("boom")
    assert not dist.is_initialized()
