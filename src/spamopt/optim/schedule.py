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


def is_reset_step(step: int, reset_interval: int) -> bool:
    """Moments are zeroed at the start of steps ``τ = ΔT, 2ΔT, …``; ``ΔT = 0`` disables resets."""
    return reset_interval > 0 and step % reset_interval == 0


def is_mask_redraw_step(step: int, reset_interval: int) -> bool:
    """Sparse masks are redrawn at the *end* of steps ``τ = kΔT − 1`` so the next (reset) step uses them."""
    return reset_interval > 0 and (step + 1) % reset_interval == 0


def mask_generation(step: int, reset_interval: int) -> int:
    """Index of the sparse mask in force during step ``τ``: 0 before the first reset, then ``⌊τ/ΔT⌋``."""
    return step // reset_interval if reset_interval > 0 else 0


def clipping_active(step: int, threshold: float, reset_interval: int, clip_delay: int) -> bool:
    """Spike clipping runs when ``θ > 0``, ``τ ≥ D`` and ``τ mod ΔT ≥ D`` (the last test only if ``ΔT > 0``).

    The delay exists because ``v`` is zero or tiny right after the start and after each reset, where the test
    ``g² > θ·v`` would fire on almost every coordinate.
    """
    if threshold <= 0 or step < clip_delay:
        return False
    return reset_interval <= 0 or step % reset_interval >= clip_delay


def steps_since_reset(step: int, reset_interval: int) -> int | None:
    """The warmup counter ``c`` of the spec during step ``τ``, or ``None`` before the first reset.

    The spec keeps ``c`` as a counter that starts at ``N + 1``, is incremented after every step and set to 0
    after steps ``kΔT − 1 ≥ 1``; that is exactly ``τ mod ΔT`` once such a step has passed, and ``≥ N`` (no
    warmup) before. Deriving it keeps one source of truth (the step count) in the checkpoint.
    """
    if reset_interval <= 0 or step // reset_interval * reset_interval < 2:
        return None
    return step % reset_interval


def warmup_multiplier(step: int, reset_interval: int, warmup_steps: int) -> float:
    """Post-reset cosine multiplier ``s(c)`` applied to the update (not to the learning rate).

    ``s(c) = 1 − 0.99 · (1 + cos(π c / (N + 1))) / 2`` for ``0 ≤ c < N`` and ``1`` otherwise, so a reset step
    runs at ``s(0) = 0.01`` and the multiplier climbs back to 1 over ``N`` steps. ``N = 0`` disables it.
    """
    c = steps_since_reset(step, reset_interval)
    if c is None or c >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * c / (warmup_steps + 1))) / 2.0


def device_decisions(
    step: Tensor, threshold: float, reset_interval: int, warmup_steps: int, clip_delay: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The decisions above for a clock held on the device: ``(reset, θ in force, s)`` as tensors.

    ``reset`` is 1.0 or 0.0 (float32), ``θ in force`` is ``θ`` or 0.0 (float32), ``s`` the warmup multiplier
    (float64). Computed with tensor operations only, so a step captured in a CUDA graph takes the decisions
    of each replay instead of those frozen at capture. Tested equal to the scalar functions.
    """
    if reset_interval > 0:
        phase = torch.remainder(step, reset_interval)
        reset = phase == 0
        after_first_reset = step // reset_interval * reset_interval >= 2  # steps_since_reset is defined
        c = phase.to(torch.float64)
        cosine = 1.0 - 0.99 * (1.0 + torch.cos(math.pi * c / (warmup_steps + 1))) / 2.0
        multiplier = torch.where(after_first_reset & (phase < warmup_steps), cosine, 1.0)
        active = (step >= clip_delay) & (phase >= clip_delay)
    else:
        reset = torch.zeros_like(step, dtype=torch.bool)
        multiplier = torch.ones_like(step, dtype=torch.float64)
        active = step >= clip_delay
    in_force = active.to(torch.float32) * threshold if threshold > 0 else torch.zeros_like(step, dtype=torch.float32)
    return reset.to(torch.float32), in_force, multiplier
