"""SPAM's step-counter arithmetic: pure functions of the 1-based step index.

Every decision SPAM takes from its clock lives here, so the optimizer, its kernels and the tests agree on
one definition. ``step`` is always ``τ = t + 1``, the 1-based index of the step being taken, where ``t``
is the number of steps completed before it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "is_reset_step",
    "is_mask_redraw_step",
    "mask_generation",
    "clipping_active",
    "steps_since_reset",
    "warmup_multiplier",
    "device_decisions",
]

Step = int | Tensor  # a host integer, or a device tensor (the CUDA-graph clock): each rule is written once for both


def _false_like(step: Step) -> bool | Tensor:
    return torch.zeros_like(step, dtype=torch.bool) if isinstance(step, Tensor) else False


def is_reset_step(step: Step, reset_interval: int) -> bool | Tensor:
    """Moments are zeroed at the start of steps ``τ = ΔT, 2ΔT, …``; ``ΔT = 0`` disables resets."""
    if reset_interval <= 0:
        return _false_like(step)
    return step % reset_interval == 0


def is_mask_redraw_step(step: int, reset_interval: int) -> bool:
    """Sparse masks are redrawn at the *end* of steps ``τ = kΔT − 1`` so the next (reset) step uses them."""
    return reset_interval > 0 and (step + 1) % reset_interval == 0


def mask_generation(step: int, reset_interval: int) -> int:
    """Index of the sparse mask in force during step ``τ``: 0 before the first reset, then ``⌊τ/ΔT⌋``."""
    return step // reset_interval if reset_interval > 0 else 0


def clipping_active(step: Step, threshold: float, reset_interval: int, clip_delay: int) -> bool | Tensor:
    """Spike clipping runs when ``θ > 0``, ``τ ≥ D`` and ``τ mod ΔT ≥ D`` (the last test only if ``ΔT > 0``).

    The delay exists because ``v`` is zero or tiny right after the start and after each reset, where the test
    ``g² > θ·v`` would fire on almost every coordinate.
    """
    if threshold <= 0:
        return _false_like(step)
    active = step >= clip_delay
    if reset_interval > 0:
        active = active & (step % reset_interval >= clip_delay)
    return active


def steps_since_reset(step: Step, reset_interval: int) -> Step | None:
    """The warmup counter ``c`` of the spec during step ``τ``, or ``None`` before the first reset (for a tensor
    clock: ``c``, meaningful where :func:`_after_first_reset` holds).

    The spec keeps ``c`` as a counter that starts at ``N + 1``, is incremented after every step and set to 0
    after steps ``kΔT − 1 ≥ 1``; that is exactly ``τ mod ΔT`` once such a step has passed, and ``≥ N`` (no
    warmup) before. Deriving it keeps one source of truth (the step count) in the checkpoint.
    """
    if reset_interval <= 0:
        return None
    if not isinstance(step, Tensor) and not _after_first_reset(step, reset_interval):
        return None
    return step % reset_interval


def _after_first_reset(step: Step, reset_interval: int) -> bool | Tensor:
    return step // reset_interval * reset_interval >= 2


def warmup_multiplier(step: Step, reset_interval: int, warmup_steps: int) -> float | Tensor:
    """Post-reset cosine multiplier ``s(c)`` applied to the update (not to the learning rate).

    ``s(c) = 1 − 0.99 · (1 + cos(π c / (N + 1))) / 2`` for ``0 ≤ c < N`` and ``1`` otherwise, so a reset step
    runs at ``s(0) = 0.01`` and the multiplier climbs back to 1 over ``N`` steps. ``N = 0`` disables it.
    For a tensor clock the result is a float64 tensor.
    """
    c = steps_since_reset(step, reset_interval)
    if isinstance(step, Tensor):
        if c is None:
            return torch.ones_like(step, dtype=torch.float64)
        c = c.to(torch.float64)
        cosine = 1.0 - 0.99 * (1.0 + torch.cos(math.pi * c / (warmup_steps + 1))) / 2.0
        return torch.where(_after_first_reset(step, reset_interval) & (c < warmup_steps), cosine, 1.0)
    if c is None or c >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * c / (warmup_steps + 1))) / 2.0


def device_decisions(
    step: Tensor, threshold: float, reset_interval: int, warmup_steps: int, clip_delay: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The rules above evaluated on a clock held on the device: ``(reset, θ in force, s)`` as tensors.

    ``reset`` is 1.0 or 0.0 (float32), ``θ in force`` is ``θ`` or 0.0 (float32), ``s`` the warmup multiplier
    (float64). Tensor operations only, so a step captured in a CUDA graph takes the decisions of each replay
    instead of those frozen at capture.
    """
    reset = is_reset_step(step, reset_interval).to(torch.float32)
    in_force = clipping_active(step, threshold, reset_interval, clip_delay).to(torch.float32) * threshold
    return reset, in_force, warmup_multiplier(step, reset_interval, warmup_steps)
