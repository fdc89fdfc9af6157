"""Learning-rate schedules as multipliers of the peak rate, for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math

__all__ = ["lr_multiplier"]


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup ``(step+1)/warmup`` for the first ``warmup_steps`` updates, then a cosine from 1 down to
    ``min_ratio`` at the last update (0-based ``step``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
