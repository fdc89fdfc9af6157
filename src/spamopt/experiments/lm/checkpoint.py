"""Atomic training checkpoints: model, optimizer, scheduler, clipper, data position and RNG in one file.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict`` as full (unsharded) state
dicts keyed by parameter name, so a checkpoint written by a single process, DDP or FSDP2 loads into any of them.
Rank 0 writes ``checkpoint.pt.tmp``, flushes it to disk and renames it over ``checkpoint.pt``: a crash or a
kill at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

CHECKPOINT = "checkpoint.pt"


def _options(distributed: bool) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=distributed)


def save(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, distributed: bool,
         **extra: Any) -> None:
    """Gather the full state on rank 0 and write it atomically; every rank must call this."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(distributed))
    if rank != 0:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save({"model": model_state, "optimizer": optimizer_state, **extra}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> dict[str, Any]:
    """Restore model and optimizer from ``path`` on every rank; returns the rest of the checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=checkpoint.pop("model"),
                   optim_state_dict=checkpoint.pop("optimizer"), options=_options(distributed))
    return checkpoint
