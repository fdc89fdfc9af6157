"""Deterministic gradient streams shared by the optimizer tests."""

from __future__ import annotations

import numpy as np
import torch


def spiky_gradients(shapes, steps, seed=0, spike_rate=0.02, spike_scale=1000.0, dtype=np.float64):
    """Per step, Gaussian gradients of scale 0.01 with ``spike_rate`` of coordinates multiplied by 1000."""
    rng = np.random.default_rng(seed)
    stream = []
    for _ in range(steps):
        grads = []
        for shape in shapes:
            g = np.asarray(rng.standard_normal(shape) * 0.01)
            g[np.asarray(rng.random(shape) < spike_rate)] *= spike_scale
            grads.append(g.astype(dtype))
        stream.append(grads)
    return stream


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.tensor(np.asarray(g)).to(p)
