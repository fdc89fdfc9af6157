"""Atomic training checkpoints: model and optimizer state plus whatever a family adds (scheduler, clipper, data
position, RNG, ...) in one file.

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

__all__ = ["CHECKPOINT", "register_state_object", "save", "load", "write_atomically"]

CHECKPOINT = "checkpoint.pt"

# Optimizer-state objects that are not tensors (GaLore keeps its projector in the state), saved as their
# attributes beside the state dict and rebuilt on load. Only registered classes are rebuilt, so loading stays
# as safe as ``torch.load(weights_only=True)``.
STATE_OBJECTS: set[str] = set()


def register_state_object(class_name: str) -> None:
    """Allow optimizer-state objects of ``class_name`` (``module.QualifiedName``) in checkpoints."""
    STATE_OBJECTS.add(class_name)


def _class_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _parameter_names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {p: name.removeprefix("module.") for name, p in model.named_parameters()}


def _detach_objects(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Take allowed objects out of the optimizer state (``torch.distributed.checkpoint`` handles tensors and
    plain values only); returns ``{parameter name: {state key: object}}``."""
    names = _parameter_names(model)
    detached: dict[str, dict[str, Any]] = {}
    for param, state in optimizer.state.items():
        for key, value in list(state.items()):
            if _class_name(value) in STATE_OBJECTS:
                detached.setdefault(names[param], {})[key] = state.pop(key)
    return detached


def _attach_objects(model: nn.Module, optimizer: torch.optim.Optimizer, objects: dict[str, dict[str, Any]]) -> None:
    params = {name: p for p, name in _parameter_names(model).items()}
    for name, entries in objects.items():
        optimizer.state[params[name]].update(entries)


def _encode(value: Any) -> dict[str, Any]:
    return {"class": _class_name(value), "attributes": vars(value)}


def _decode(encoded: dict[str, Any]) -> Any:
    import importlib

    if encoded["class"] not in STATE_OBJECTS:
        raise ValueError(f"checkpoint holds an optimizer-state object of unknown class {encoded['class']!r}")
    module, _, name = encoded["class"].rpartition(".")
    instance = object.__new__(getattr(importlib.import_module(module), name))
    instance.__dict__.update(encoded["attributes"])
    return instance


def _options(distributed: bool) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=distributed)


def save(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, distributed: bool,
         **extra: Any) -> None:
    """Gather the full state on rank 0 and write it atomically; every rank must call this."""
    objects = _detach_objects(model, optimizer)
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(distributed))
    finally:
        _attach_objects(model, optimizer, objects)
    if rank != 0:
        return
    encoded = {name: {key: _encode(value) for key, value in entries.items()} for name, entries in objects.items()}
    write_atomically(path, {"model": model_state, "optimizer": optimizer_state, "optimizer_objects": encoded,
                            **extra})


def write_atomically(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to ``path.tmp``, flushed to disk, then renamed over ``path``: a crash at any moment leaves
    either the previous file or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> dict[str, Any]:
    """Restore model and optimizer from ``path`` on every rank; returns the rest of the checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=checkpoint.pop("model"),
                   optim_state_dict=checkpoint.pop("optimizer"), options=_options(distributed))
    objects = checkpoint.pop("optimizer_objects", {})
    _attach_objects(model, optimizer, {name: {key: _decode(value) for key, value in entries.items()}
                                       for name, entries in objects.items()})
    return checkpoint
