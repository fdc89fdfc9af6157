r"""SPAM's update, written once per implementation: a for-loop reference and a multi-tensor (foreach) path.

Both functions take the same arguments and are tested to agree to floating-point rounding. The caller
(:class:`spamopt.SPAM`) reads its step clock and passes the *decisions* of this step (reset or not, clip
threshold in force, post-reset multiplier) as plain Python values; everything that depends on the data
(the non-finite skip flag, the per-parameter bias-correction count) stays a device tensor, so a step never
waits for the GPU.

For each parameter, with ``g`` a private copy of its gradient (``p.grad`` is never written)::

    if reset:            m, v ← 0, 0            (and k ← 0 when bias_correction_reset)
    k ← k + keep
    if threshold > 0:    g ← clamp(g, −sqrt(θ·v), +sqrt(θ·v))   ≡ sign(g)·sqrt(θ·v) where g² > θ·v
    m ← β1·m + (1 − β1)·g
    v ← β2·v + (1 − β2)·g²
    p ← p − lr · s · sqrt(1 − β2^k) / (1 − β1^k) · m / (sqrt(v) + ε)
    p ← p − lr · wd · p                          (after the update, all coordinates, not scaled by s)

``keep`` is 1, or 0 for a step whose gradients were not all finite: then ``g`` is zeroed and every update
above is multiplied away, so nothing moves and no NaN or Inf is written. For a sparse parameter the same
update runs on the gathered kept coordinates and is scattered back.
"""

from __future__ import annotations

from collections import defaultdict
from numbers import Number

import torch
from torch import Tensor

from . import sparse

__all__ = ["spam"]


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _gradient_copy(grad: Tensor, mask: Tensor | None, keep: Tensor | None, maximize: bool) -> Tensor:
    """A private, finite copy of the gradient (kept coordinates only for a sparse parameter)."""
    g = grad if mask is None else sparse.gather(grad, mask)
    if keep is None:  # no skipping: non-finite coordinates count as zero gradient
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        g = torch.where(keep, g, 0.0)
    return g.neg_() if maximize else g


def _step_sizes(
    steps: list[Tensor], lr: float | Tensor, beta1: float, beta2: float, scale: float | Tensor, dtype: torch.dtype
) -> Tensor:
    """``−lr · scale · sqrt(1 − β2^k) / (1 − β1^k)`` per parameter, computed in float64 on the device.

    ``k`` is clamped to 1 so that a parameter whose first step is skipped (``scale = 0``) gets 0, not 0/0.
    """
    k = torch.stack(steps).to(torch.float64).clamp_(min=1.0)
    bias_correction1 = 1.0 - torch.pow(beta1, k)
    bias_correction2 = 1.0 - torch.pow(beta2, k)
    return (bias_correction2.sqrt_() / bias_correction1).mul_(-lr * scale).to(dtype)


def _single_tensor_spam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    masks: list[Tensor | None],
    *,
    keep: Tensor | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    threshold: float,
    reset: bool,
    warmup_multiplier: float,
    bias_correction_reset: bool,
    maximize: bool,
    clip_counts: list[Tensor] | None,
) -> None:
    for i, (param, grad, exp_avg, exp_avg_sq, step, mask) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, steps, masks)
    ):
        param, grad, exp_avg, exp_avg_sq = _real(param), _real(grad), _real(exp_avg), _real(exp_avg_sq)
        keep_here = None if keep is None else keep.to(param.device, non_blocking=True)
        keep_float: float | Tensor = 1.0 if keep_here is None else keep_here.to(torch.float64)
        g = _gradient_copy(grad, mask, keep_here, maximize)
        work = param if mask is None else sparse.gather(param, mask)

        if reset:
            exp_avg.zero_()
            exp_avg_sq.zero_()
            if bias_correction_reset:
                step.zero_()
        step.add_(keep_float)

        if threshold > 0:
            bound = exp_avg_sq.mul(threshold).sqrt_()
            if clip_counts is not None:
                clip_counts[i] = torch.count_nonzero(g.abs() > bound)
            torch.minimum(g, bound, out=g)
            torch.maximum(g, bound.neg_(), out=g)
            del bound

        exp_avg.mul_(1.0 - (1.0 - beta1) * keep_float).add_(g, alpha=1.0 - beta1)
        exp_avg_sq.mul_(1.0 - (1.0 - beta2) * keep_float).addcmul_(g, g, value=1.0 - beta2)
        del g

        step_size = _step_sizes([step], lr, beta1, beta2, warmup_multiplier * keep_float, work.dtype)[0]
        update = exp_avg_sq.sqrt().add_(eps).reciprocal_().mul_(step_size)
        work.addcmul_(exp_avg, update)
        if mask is not None:
            sparse.scatter_(param, mask, work)
        if weight_decay != 0:
            param.mul_(1.0 - lr * weight_decay * keep_float)


def _multi_tensor_spam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    masks: list[Tensor | None],
    *,
    keep: Tensor | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    threshold: float,
    reset: bool,
    warmup_multiplier: float,
    bias_correction_reset: bool,
    maximize: bool,
    clip_counts: list[Tensor] | None,
) -> None:
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    reals = [_real(p) for p in params]
    for i, p in enumerate(reals):
        buckets[(p.device, p.dtype)].append(i)

    for (device, dtype), index in buckets.items():
        keep_here = None if keep is None else keep.to(device, non_blocking=True)
        keep_float: float | Tensor = 1.0 if keep_here is None else keep_here.to(torch.float64)
        full = [reals[i] for i in index]
        ms = [_real(exp_avgs[i]) for i in index]
        vs = [_real(exp_avg_sqs[i]) for i in index]
        ks = [steps[i] for i in index]
        gs = [_gradient_copy(_real(grads[i]), masks[i], keep_here, maximize) for i in index]
        work = [p if masks[i] is None else sparse.gather(p, masks[i]) for i, p in zip(index, full)]

        if reset:
            torch._foreach_zero_(ms)
            torch._foreach_zero_(vs)
            if bias_correction_reset:
                torch._foreach_zero_(ks)
        torch._foreach_add_(ks, keep_float if isinstance(keep_float, Number) else keep_float.float())

        if threshold > 0:
            bounds = torch._foreach_mul(vs, threshold)
            torch._foreach_sqrt_(bounds)
            if clip_counts is not None:
                for i, g, b in zip(index, gs, bounds):
                    clip_counts[i] = torch.count_nonzero(g.abs() > b)
            torch._foreach_minimum_(gs, bounds)
            torch._foreach_neg_(bounds)
            torch._foreach_maximum_(gs, bounds)
            del bounds

        torch._foreach_mul_(ms, 1.0 - (1.0 - beta1) * keep_float)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, 1.0 - (1.0 - beta2) * keep_float)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        del gs

        updates = torch._foreach_sqrt(vs)
        torch._foreach_add_(updates, eps)
        torch._foreach_reciprocal_(updates)
        step_sizes = _step_sizes(ks, lr, beta1, beta2, warmup_multiplier * keep_float, dtype)
        torch._foreach_mul_(updates, step_sizes.unbind(0))
        torch._foreach_addcmul_(work, ms, updates)
        del updates

        for i, p, w in zip(index, full, work):
            if masks[i] is not None:
                sparse.scatter_(p, masks[i], w)
        if weight_decay != 0:
            decay = 1.0 - lr * weight_decay * keep_float
            torch._foreach_mul_(full, decay if isinstance(decay, Number) else decay.to(dtype))


def spam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    masks: list[Tensor | None],
    *,
    keep: Tensor | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    threshold: float,
    reset: bool,
    warmup_multiplier: float,
    bias_correction_reset: bool,
    maximize: bool,
    foreach: bool,
    clip_counts: list[Tensor] | None = None,
) -> None:
    """Functional SPAM step over parallel lists (see the module docstring for the math).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: parameters, their gradients (read only) and moments; for a
            sparse parameter the moments are the compact buffers of its kept coordinates.
        steps: per-parameter bias-correction counts ``k`` (0-dim float32 tensors, updated in place).
        masks: per parameter, ``None`` (dense) or the flat boolean mask of kept coordinates.
        keep: 0-dim boolean tensor, ``False`` to skip this step; ``None`` zeroes non-finite coordinates.
        threshold: the spike threshold θ in force for this step (0: no clipping this step).
        reset: zero the moments before the update.
        warmup_multiplier: the post-reset multiplier ``s`` for this step.
        clip_counts: optional list as long as ``params``; when clipping is active, entry ``i`` is set to a
            0-dim tensor counting the coordinates of parameter ``i`` clipped this step.
    """
    impl = _multi_tensor_spam if foreach else _single_tensor_spam
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
        masks,
        keep=keep,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        threshold=threshold,
        reset=reset,
        warmup_multiplier=warmup_multiplier,
        bias_correction_reset=bias_correction_reset,
        maximize=maximize,
        clip_counts=clip_counts,
    )
