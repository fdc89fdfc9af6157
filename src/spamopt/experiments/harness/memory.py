"""Optimizer-state memory of the memory-efficient optimizers, and the SPAM density that matches a budget.

The SPAM paper compares sparse-momentum SPAM with GaLore at equal optimizer memory: its densities (0.3225 at
60M, 0.4306 at 130M) are GaLore's state at ranks 128 and 256 — projector included — divided by Adam's two
moments, over the block matrices. Per matrix of shape ``m × n`` (fp32 state, 4 bytes per value):

* GaLore at rank ``r``: the projector, ``min(m, n) · r`` values, and its two moments of the projected gradient,
  ``2 · r · max(m, n)`` values (galore-torch projects the smaller side; tested against its real state);
* sparse SPAM at density ``d``: ``2 · kept`` moment values (``kept ≈ d · m · n``, exactly
  :func:`spamopt.optim.sparse.kept_count`) plus a bitmask of ``⌈m·n/8⌉`` bytes (the paper's comparison
  counts moments only).

:func:`matched_density` solves ``SPAM(d) = budget`` for ``d`` over the block matrices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from spamopt.optim import sparse

__all__ = ["galore_state_bytes", "sparse_spam_state_bytes", "matched_density"]

Shape = tuple[int, ...]
FP32 = 4


def galore_state_bytes(shapes: Iterable[Shape], rank: int, element_bytes: int = FP32) -> int:
    """GaLore's projector and moments for matrices of ``shapes`` at ``rank``."""
    total = 0
    for m, n in shapes:
        r = min(rank, m, n)
        total += (min(m, n) * r + 2 * r * max(m, n)) * element_bytes
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
