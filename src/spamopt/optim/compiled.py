"""SPAM's per-tensor update as one ``torch.compile``-generated loop (C++ with vector instructions on the CPU,
a Triton kernel on CUDA): one read of ``p, g, m, v`` and one write of ``p, m, v`` per coordinate instead of
the dozen passes of the eager implementations.

The kernel sees only tensors: this step's learning rate, bias correction and warmup multiplier arrive folded
into a 0-dim ``step_size``, and θ, the skip flag, the decay factor, the loss-scale inverse and the betas in
one small ``scalars`` tensor, so no schedule, group or hyperparameter changes the compiled code. It is
compiled once for every tensor size (``dynamic=True``) per dtype, twice if clip counts are asked for
(telemetry). Resets zero the moments before the kernel (once per period); sparse parameters gather their
kept coordinates, run the same kernel and scatter back.
"""

from __future__ import annotations

import functools
import shutil
from typing import Any

import torch
from torch import Tensor

__all__ = ["compiled_available", "spam_kernel"]


@functools.cache
def compiled_available(device_type: str) -> bool:
    """``torch.compile`` can build kernels here: a C++ compiler on the CPU, Triton on CUDA."""
    if device_type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    if device_type == "cuda":
        from .fused import fused_available

        return fused_available(torch.device("cuda"))
    return False


def _update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_size: Tensor,
            scalars: Tensor, *, count: bool) -> Tensor | None:
    """In place on 1-D ``param`` (any float dtype; updated in the moments' dtype and rounded once),
    ``exp_avg``, ``exp_avg_sq``; returns the number of clipped coordinates when ``count``.

    ``scalars`` (float64) holds, in order: keep (0 skips the step), θ (0: no clipping this step), clip
    coordinates with v = 0 (1) or not (0), the gradient's factor (loss-scale inverse, negated to maximise),
    the decay factor, 1 − β1, 1 − β2 (taken in float64: 1 − β2 in float32 is 1.3e-5 off for β2 = 0.999),
    ε. Non-finite gradient coordinates count as 0 (a step with any is skipped
    through keep when the optimizer skips them)."""
    dtype = exp_avg.dtype
    keep, threshold, clip_unseen, factor, decay, one_minus_beta1, one_minus_beta2, eps = scalars.to(dtype).unbind(0)
    grad = grad.to(dtype)
    # |g| < inf is False for NaN and ±Inf: one vector compare (nan_to_num's isnan is a scalar loop on the CPU).
    g = torch.where((grad.abs() < float("inf")) & (keep > 0), grad, 0.0) * factor
    bound = (exp_avg_sq * threshold).sqrt()
    bound = torch.where((exp_avg_sq == 0) & (clip_unseen == 0), float("inf"), bound)
    over = g.abs() > bound
    g = torch.where((threshold > 0) & over, torch.where(g > 0, bound, -bound), g)
    m = exp_avg * (1.0 - one_minus_beta1 * keep) + one_minus_beta1 * g
    v = exp_avg_sq * (1.0 - one_minus_beta2 * keep) + one_minus_beta2 * g * g
    p = (param.to(dtype) + m * (step_size / (v.sqrt() + eps))) * decay
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.copy_(p)
    return ((threshold > 0) & over).sum() if count else None


def _counting(*args: Tensor) -> Tensor | None:
    return _update(*args, count=True)


def _plain(*args: Tensor) -> None:
    _update(*args, count=False)


# Each kernel is compiled once per dtype and once more for 1-element tensors (the compiler specialises sizes
# 0 and 1): up to 10 versions for float32/bfloat16/float16/float64 parameters, above dynamo's default limit of 8.
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
RECOMPILE_LIMIT = 16


@functools.cache
def spam_kernel(count: bool) -> Any:
    """The compiled update, with or without the clip count (two functions, so two caches), built on first use;
    call it inside :func:`limits`."""
    return torch.compile(_counting if count else _plain, dynamic=True, fullgraph=True)


def limits() -> Any:
    """The context the kernels run in: room for every dtype's version."""
    return torch._dynamo.config.patch(**{_LIMIT: max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, _LIMIT))})
