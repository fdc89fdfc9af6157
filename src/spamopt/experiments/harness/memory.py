"""Optimizer-state memory of the memory-efficient optimizers, the SPAM density that matches a budget, and the
measured peak memory of a training step.

The SPAM paper compares sparse-momentum SPAM with GaLore at equal optimizer memory: its densities (0.3225 at
60M, 0.4306 at 130M) are GaLore's state at ranks 128 and 256 — projector included — divided by Adam's two
moments, over the block matrices. Per matrix of shape ``m × n`` (fp32 state, 4 bytes per value):

* GaLore at rank ``r``, nominally (the paper's count): the projector, ``min(m, n) · r`` values, and its two
  moments of the projected gradient, ``2 · r · max(m, n)`` values (galore-torch projects the smaller side);
* GaLore at rank ``r`` as galore-torch holds it: its projector is a slice of the full SVD factor, which stays
  alive whole, so ``min(m, n)² + 2 · r · max(m, n)`` values (tested against its real state);
* sparse SPAM at density ``d``: ``2 · kept`` moment values (``kept ≈ d · m · n``, exactly
  :func:`spamopt.optim.sparse.kept_count`) plus a bitmask of ``⌈m·n/8⌉`` bytes (the paper's comparison
  counts moments only).

:func:`matched_density` solves ``SPAM(d) = budget`` for ``d`` over the block matrices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from spamopt.optim import sparse

from .optimizers import state_bytes, tensor_bytes

__all__ = ["galore_state_bytes", "galore_held_bytes", "sparse_spam_state_bytes", "matched_density", "resident_bytes",
           "step_peak_memory"]

Shape = tuple[int, ...]
FP32 = 4


def galore_state_bytes(shapes: Iterable[Shape], rank: int, element_bytes: int = FP32) -> int:
    """GaLore's projector and moments for matrices of ``shapes`` at ``rank``."""
    total = 0
    for m, n in shapes:
        r = min(rank, m, n)
        total += (min(m, n) * r + 2 * r * max(m, n)) * element_bytes
    return total


def galore_held_bytes(shapes: Iterable[Shape], rank: int, element_bytes: int = FP32) -> int:
    """The optimizer state galore-torch really keeps alive for matrices of ``shapes`` at ``rank``: the whole
    ``min(m, n)²`` SVD factor its projector slices, and the moments."""
    total = 0
    for m, n in shapes:
        r = min(rank, m, n)
        total += (min(m, n) ** 2 + 2 * r * max(m, n)) * element_bytes
    return total


def sparse_spam_state_bytes(shapes: Iterable[Shape], density: float, element_bytes: int = FP32,
                            include_mask: bool = True) -> int:
    """Sparse SPAM's compact moments (and bitmasks) for matrices of ``shapes`` at ``density``."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        total += 2 * sparse.kept_count(numel, density) * element_bytes
        if include_mask:
            total += (numel + 7) // 8
    return total


def matched_density(shapes: Iterable[Shape], budget_bytes: int, element_bytes: int = FP32,
                    include_mask: bool = False) -> float:
    """The density at which sparse SPAM's state on ``shapes`` equals ``budget_bytes`` (moments only by default,
    as the paper counted; ``include_mask`` also counts our 1-bit masks), rounded to 4 decimals like the paper's
    figures. Raises ``ValueError`` when no density in ``(0, 1]`` fits."""
    shapes = list(shapes)
    elements = sum(math.prod(s) for s in shapes)
    mask = sum((math.prod(s) + 7) // 8 for s in shapes) if include_mask else 0
    density = (budget_bytes - mask) / (2 * elements * element_bytes)
    if not 0 < density <= 1:
        raise ValueError(f"Invalid budget value: {budget_bytes} bytes (sparse SPAM on these matrices holds between "
                         f"{mask} and {2 * elements * element_bytes + mask} bytes)")
    return round(density, 4)


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's parameters, buffers and gradients and of the optimizer's state, as held now
    (distributed tensors count their local shard)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    return sum(map(tensor_bytes, tensors)) + state_bytes(optimizer)


CPU_PEAK_METHOD = ("parameters, buffers, gradients and optimizer state held before the step, plus the peak of the "
                   "bytes torch's CPU allocator handed out during it (torch.profiler allocation events: "
                   "activations, gradients, new state, temporaries; not Python objects or library workspaces)")
CUDA_PEAK_METHOD = "torch.cuda.max_memory_allocated over the step (the caching allocator's live tensor bytes)"


@contextmanager
def step_peak_memory(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> Iterator[dict]:
    """Measure the peak memory of the training step run inside the block; the yielded dict receives ``bytes``
    and ``method`` on exit (nothing on other devices, or on a CPU already under a profiler).

    On CUDA this is the allocator's peak. The CPU allocator keeps no peak, so there it is the memory resident
    before the step (:func:`resident_bytes`) plus the highest running total of the allocations made during the
    step, which the profiler reports per allocation (``total_allocated`` counts only allocations made while
    profiling, net of their frees)."""
    measured: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield measured
        torch.cuda.synchronize(device)
        measured.update(bytes=torch.cuda.max_memory_allocated(device), method=CUDA_PEAK_METHOD)
    elif device.type == "cpu" and not torch.autograd.profiler._is_profiler_enabled:  # profilers don't nest
        before = resident_bytes(model, optimizer)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            yield measured
        measured.update(bytes=before + _peak_allocated(prof), method=CPU_PEAK_METHOD)
    else:
        yield measured


def _peak_allocated(prof: torch.profiler.profile) -> int:
    """The highest net bytes allocated since the profile began. Each allocation event carries the reporter's
    running total, which outlives a profile (tensors allocated under an earlier one still count), so the
    total before the first event is the zero."""
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if "Allocation" in str(event.tag):
            events.append((event.start_time_ns, event.extra_fields.total_allocated, event.extra_fields.alloc_size))
        stack.extend(event.children)
    if not events:
        return 0
    _, total, size = min(events)
    return max(0, max(e[1] for e in events) - (total - size))
