"""One process, or the ``torchrun`` group: rank, world size, device, and a clean teardown."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Processes", "is_rank_zero", "run_command"]


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @staticmethod
    def start() -> Processes:
        """One process, or the ``torchrun`` group (NCCL on GPUs, gloo on CPUs)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if world > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Processes(dist.get_rank() if world > 1 else 0, world, device)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: Tensor) -> Tensor:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_rank_zero() -> bool:
    """Whether this process writes shared outputs (reports): rank 0 of a group, or the only process."""
    if _grouped():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def run_command(work: Callable[[], Any], show: Callable[[Any], None] = print) -> None:
    """Run a command's ``work``; rank 0 shows its result. Under ``torchrun`` every rank then waits for the
    others, closes the process group and exits at once: gloo's worker threads can still be alive during
    interpreter finalisation and abort it ("terminate called without an active exception",
    pytorch/pytorch#190489), and all work is written by then. A failing rank closes the group and raises."""
    try:
        result = work()
        if is_rank_zero():
            show(result)
    except BaseException:
        if _grouped():
            dist.destroy_process_group()
        raise
    if _grouped():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
