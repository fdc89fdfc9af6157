"""Training checkpoints that a crash, a full disk or a damaged file cannot turn into wrong results: model and
optimizer state plus whatever a family adds (scheduler, clipper, data position, RNG, ...) in one file.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict`` as full (unsharded) state
dicts keyed by parameter name, so a checkpoint written by a single process, DDP or FSDP2 loads into any of them.

* Atomic: rank 0 writes ``checkpoint.pt.tmp``, flushes it to disk, moves the previous checkpoint to
  ``checkpoint.prev.pt`` and renames the new one into place; a kill at any moment leaves a whole checkpoint.
* Verified: every checkpoint stores a SHA-256 digest of its contents (each tensor's bytes, dtype and shape, and
  every other value); :func:`read` recomputes it, and :func:`load` falls back to the previous checkpoint, with
  a warning, when the newest is missing, unreadable or fails the check.
* Finite: :func:`save` refuses parameters or a loss that are not finite (:class:`NonFiniteError`), so a
  diverging run never replaces its last good checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from spamopt.optim.base import local

__all__ = ["CHECKPOINT", "PREVIOUS", "NonFiniteError", "CorruptCheckpointError", "register_state_object", "save",
           "load", "read", "available", "write_atomically"]

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
_DIGEST = "sha256"


class NonFiniteError(RuntimeError):
    """The model's parameters or loss are NaN or infinite at ``step``; the last checkpoint was kept."""

    def __init__(self, step: int, what: str, path: Path) -> None:
        super().__init__(f"step {step}: {what} not finite; the run stopped there and kept its last good "
                         f"checkpoint ({path})")
        self.step = step


class CorruptCheckpointError(RuntimeError):
    """No checkpoint of a run could be read and verified."""

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


def _first_nonfinite(model: nn.Module, loss: float | Tensor | None, distributed: bool) -> str | None:
    """What is not finite (a parameter's name, or the loss), checked on every rank's shard: every rank gets the
    same answer."""
    flags = [torch.isfinite(local(p.detach())).all() for p in model.parameters()]
    if loss is not None:
        flags.append(torch.isfinite(torch.as_tensor(loss)).all())
    finite = torch.stack([flag.to(flags[0].device) for flag in flags]).to(torch.int32)
    if distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    bad = (finite == 0).nonzero().flatten().tolist()
    if not bad:
        return None
    names = [name.removeprefix("module.") for name, _ in model.named_parameters()]
    return f"parameter {names[bad[0]]!r} is" if bad[0] < len(names) else "the loss is"


def save(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, distributed: bool,
         step: int, loss: float | Tensor | None = None, **extra: Any) -> None:
    """Gather the full state on rank 0 and write it atomically with its digest; every rank must call this.
    Raises :class:`NonFiniteError` (writing nothing) when a parameter or ``loss`` (the latest training loss)
    is not finite."""
    problem = _first_nonfinite(model, loss, distributed)
    if problem is not None:
        raise NonFiniteError(step, problem, path)
    objects = _detach_objects(model, optimizer)
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(distributed))
    finally:
        _attach_objects(model, optimizer, objects)
    if rank != 0:
        return
    encoded = {name: {key: _encode(value) for key, value in entries.items()} for name, entries in objects.items()}
    write_atomically(path, {"model": model_state, "optimizer": optimizer_state, "optimizer_objects": encoded,
                            "step": step, **extra})


def _previous(path: Path) -> Path:
    return path.with_name(PREVIOUS) if path.name == CHECKPOINT else path.with_name(path.stem + ".prev" + path.suffix)


def digest(payload: Any) -> str:
    """SHA-256 of a checkpoint payload: each tensor's dtype, shape and bytes, and the ``repr`` of every other
    value, in order (dicts keep their order through ``torch.save``)."""
    hasher = hashlib.sha256()
    stack = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, Tensor):
            tensor = value.detach().cpu().contiguous()
            hasher.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            hasher.update(f"dict {len(value)};".encode())
            for key, item in reversed(list(value.items())):
                stack += [item, repr(key)]
        elif isinstance(value, (list, tuple)):
            hasher.update(f"{type(value).__name__} {len(value)};".encode())
            stack += reversed(value)
        else:
            hasher.update(f"{type(value).__name__} {value!r};".encode())
    return hasher.hexdigest()


def write_atomically(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` of ``payload`` and its digest to ``path.tmp``, flushed to disk; then the file at ``path``
    becomes the previous checkpoint and the new one takes its place. A crash at any moment leaves whole files;
    a failed write (a full disk) removes the temporary and raises an ``OSError`` naming ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save({**payload, _DIGEST: digest(payload)}, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, RuntimeError) as error:
        tmp.unlink(missing_ok=True)
        raise OSError(f"could not write checkpoint {path} (is the disk full?): {error}; the previous checkpoint "
                      "is kept") from None
    if path.exists():
        os.replace(path, _previous(path))
    os.replace(tmp, path)


def available(path: Path) -> bool:
    """Whether ``path`` or the previous checkpoint beside it exists (a kill between the two renames of
    :func:`write_atomically` leaves only the previous one)."""
    return path.exists() or _previous(path).exists()


def _read_verified(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch raises anything from EOFError to RuntimeError here)
        raise CorruptCheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: "
                                     f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CorruptCheckpointError(f"{path} is not a spamopt checkpoint (no model state)")
    stored = payload.pop(_DIGEST, None)
    if stored is not None and stored != digest(payload):
        raise CorruptCheckpointError(f"{path} fails its checksum: its contents changed after it was written")
    return payload


def read(path: Path) -> dict[str, Any]:
    """The verified contents of the checkpoint ``path``, or of the previous one beside it when ``path`` is
    missing, unreadable or fails its checksum (with a warning); :class:`CorruptCheckpointError` when neither
    holds a whole checkpoint."""
    problems = []
    for candidate in (path, _previous(path)):
        if not candidate.exists():
            problems.append(f"{candidate} does not exist")
            continue
        try:
            payload = _read_verified(candidate)
        except CorruptCheckpointError as error:
            problems.append(str(error))
            continue
        if candidate != path:
            warnings.warn(f"{problems[0]}: resuming from the previous checkpoint {candidate}", stacklevel=2)
        return payload
    raise CorruptCheckpointError("; ".join(problems) + " (start the run over with --overwrite)")


def load(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> dict[str, Any]:
    """Restore model and optimizer from the checkpoint ``path`` (verified; see :func:`read`) on every rank;
    returns the rest of the checkpoint."""
    checkpoint = read(path)
    set_state_dict(model, optimizer, model_state_dict=checkpoint.pop("model"),
                   optim_state_dict=checkpoint.pop("optimizer"), options=_options(distributed))
    objects = checkpoint.pop("optimizer_objects", {})
    _attach_objects(model, optimizer, {name: {key: _decode(value) for key, value in entries.items()}
                                       for name, entries in objects.items()})
    return checkpoint
