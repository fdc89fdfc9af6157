r"""SPAM's update, written once per implementation: a for-loop reference, a multi-tensor (foreach) path, a
fused Triton kernel (:mod:`.fused`) and a ``torch.compile``-generated loop (:mod:`.compiled`).

All four take the same arguments and are tested to agree to floating-point rounding. The caller
(:class:`spamopt.SPAM`) reads its step clock and passes the *decisions* of this step (reset or not, clip
threshold in force, post-reset multiplier) as plain Python values; everything that depends on the data
(the non-finite skip flag, the per-parameter bias-correction count) stays a device tensor, so a step never
waits for the GPU.

For each parameter, with ``g`` a private copy of its gradient (``p.grad`` is never written), divided by
``grad_scale`` when a ``torch.amp.GradScaler`` scaled the loss::

    if reset:            m, v ← 0, 0            (and k ← 0 when bias_correction_reset)
    k ← k + keep
    if threshold > 0:    g ← clamp(g, −sqrt(θ·v), +sqrt(θ·v))   ≡ sign(g)·sqrt(θ·v) where g² > θ·v and v > 0
                         (with clip_unseen, as the reference, also where v = 0: such g become 0)
    m ← β1·m + (1 − β1)·g
    v ← β2·v + (1 − β2)·g²
    p ← p − lr · s · sqrt(1 − β2^k) / (1 − β1^k) · m / (sqrt(v) + ε)
    p ← p − lr · wd · p                          (after the update, all coordinates, not scaled by s)

``keep`` is 1, or 0 for a step whose gradients were not all finite: then ``g`` is zeroed and every update
above is multiplied away, so nothing moves and no NaN or Inf is written. For a sparse parameter the same
update runs on the gathered kept coordinates and is scattered back.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from numbers import Number

import torch
from torch import Tensor

from . import sparse
from .base import buckets_by_device_and_dtype, gradient_copy, inverse_scale, keep_on, real_view

__all__ = ["SpamStep", "spam"]


@dataclass(frozen=True)
class SpamStep:
    """One parameter group's hyperparameters and this step's clock decisions, as every implementation takes them.

    ``threshold`` is the θ in force for this step (0: no clipping this step), ``reset`` whether the moments are
    zeroed first, ``warmup_multiplier`` the post-reset multiplier ``s``. The fused implementation also takes
    these three as device tensors (the CUDA-graph path decides them on the device).
    """

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    threshold: float | Tensor
    reset: bool | Tensor
    warmup_multiplier: float | Tensor
    bias_correction_reset: bool
    maximize: bool
    density: float = 1.0
    clip_unseen: bool = False  # clip coordinates whose v is 0 (to 0), as the reference code does


def _step_sizes(steps: list[Tensor], h: SpamStep, scale: float | Tensor, dtype: torch.dtype) -> Tensor:
    """``−lr · scale · sqrt(1 − β2^k) / (1 − β1^k)`` per parameter, computed in float64 on the device.

    ``k`` is clamped to 1 so that a parameter whose first step is skipped (``scale = 0``) gets 0, not 0/0.
    """
    k = torch.stack(steps).to(torch.float64).clamp_(min=1.0)
    bias_correction1 = 1.0 - torch.pow(h.beta1, k)
    bias_correction2 = 1.0 - torch.pow(h.beta2, k)
    return (bias_correction2.sqrt_() / bias_correction1).mul_(-h.lr * scale).to(dtype)


def _kept(bits: Tensor | None, positions: Tensor | None, numel: int) -> Tensor | None:
    """A sparse parameter's kept positions as the eager indexed copies take them (int64), or None (dense)."""
    if bits is None:
        return None
    return sparse.kept_index(bits, numel) if positions is None else positions.long()


def _single_tensor_spam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    mask_bits: list[Tensor | None],
    h: SpamStep,
    *,
    keep: Tensor | None,
    clip_counts: list[Tensor | None] | None,
    grad_scale: Tensor | None,
    kept_positions: list[Tensor | None],
) -> None:
    unscale = inverse_scale(grad_scale)
    for i, (param, grad, exp_avg, exp_avg_sq, step, bits) in enumerate(
        zip(params, grads, exp_avgs, exp_avg_sqs, steps, mask_bits)
    ):
        param, grad, exp_avg, exp_avg_sq = real_view(param), real_view(grad), real_view(exp_avg), real_view(exp_avg_sq)
        keep_here, keep_float = keep_on(keep, param.device)
        kept = _kept(bits, kept_positions[i], param.numel())
        g = gradient_copy(grad, kept, keep_here, h.maximize, exp_avg.dtype, unscale)
        full = param.to(exp_avg.dtype)  # half-precision params: update in fp32, round once at the end
        work = full if kept is None else sparse.gather(full, kept)

        if h.reset:
            exp_avg.zero_()
            exp_avg_sq.zero_()
            if h.bias_correction_reset:
                step.zero_()
        step.add_(keep_float)

        if h.threshold > 0:
            bound = exp_avg_sq.mul(h.threshold).sqrt_()
            if not h.clip_unseen:  # v = 0: no history to call g a spike against
                bound.masked_fill_(exp_avg_sq == 0, math.inf)
            if clip_counts is not None:
                clip_counts[i] = torch.count_nonzero(g.abs() > bound)
            torch.minimum(g, bound, out=g)
            torch.maximum(g, bound.neg_(), out=g)
            del bound

        exp_avg.mul_(1.0 - (1.0 - h.beta1) * keep_float).add_(g, alpha=1.0 - h.beta1)
        exp_avg_sq.mul_(1.0 - (1.0 - h.beta2) * keep_float).addcmul_(g, g, value=1.0 - h.beta2)
        del g

        step_size = _step_sizes([step], h, h.warmup_multiplier * keep_float, exp_avg.dtype)[0]
        update = exp_avg_sq.sqrt().add_(h.eps).reciprocal_().mul_(step_size)
        work.addcmul_(exp_avg, update)
        if kept is not None:
            sparse.scatter_(full, kept, work)
        if h.weight_decay != 0:
            full.mul_(1.0 - h.lr * h.weight_decay * keep_float)
        if full is not param:
            param.copy_(full)


def _multi_tensor_spam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    mask_bits: list[Tensor | None],
    h: SpamStep,
    *,
    keep: Tensor | None,
    clip_counts: list[Tensor | None] | None,
    grad_scale: Tensor | None,
    kept_positions: list[Tensor | None],
) -> None:
    unscale = inverse_scale(grad_scale)
    reals = [real_view(p) for p in params]
    for (device, _), index in buckets_by_device_and_dtype(reals).items():
        keep_here, keep_float = keep_on(keep, device)
        originals = [reals[i] for i in index]
        ms = [real_view(exp_avgs[i]) for i in index]
        full = [p.to(m.dtype) for p, m in zip(originals, ms)]  # half precision: fp32 math, one rounding
        vs = [real_view(exp_avg_sqs[i]) for i in index]
        ks = [steps[i] for i in index]
        kept = {i: _kept(mask_bits[i], kept_positions[i], reals[i].numel()) for i in index
                if mask_bits[i] is not None}
        gs = [gradient_copy(real_view(grads[i]), kept.get(i), keep_here, h.maximize, m.dtype, unscale)
              for i, m in zip(index, ms)]
        work = [p if i not in kept else sparse.gather(p, kept[i]) for i, p in zip(index, full)]

        if h.reset:
            torch._foreach_zero_(ms)
            torch._foreach_zero_(vs)
            if h.bias_correction_reset:
                torch._foreach_zero_(ks)
        torch._foreach_add_(ks, keep_float if isinstance(keep_float, Number) else [keep_float.float()] * len(ks))

        if h.threshold > 0:
            bounds = torch._foreach_mul(vs, h.threshold)
            torch._foreach_sqrt_(bounds)
            if not h.clip_unseen:
                for bound, v in zip(bounds, vs):
                    bound.masked_fill_(v == 0, math.inf)
            if clip_counts is not None:
                for i, g, b in zip(index, gs, bounds):
                    clip_counts[i] = torch.count_nonzero(g.abs() > b)
            torch._foreach_minimum_(gs, bounds)
            torch._foreach_neg_(bounds)
            torch._foreach_maximum_(gs, bounds)
            del bounds

        torch._foreach_mul_(ms, 1.0 - (1.0 - h.beta1) * keep_float)
        torch._foreach_add_(ms, gs, alpha=1.0 - h.beta1)
        torch._foreach_mul_(vs, 1.0 - (1.0 - h.beta2) * keep_float)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - h.beta2)
        del gs

        updates = torch._foreach_sqrt(vs)
        torch._foreach_add_(updates, h.eps)
        torch._foreach_reciprocal_(updates)
        step_sizes = _step_sizes(ks, h, h.warmup_multiplier * keep_float, ms[0].dtype)
        torch._foreach_mul_(updates, step_sizes.unbind(0))
        torch._foreach_addcmul_(work, ms, updates)
        del updates

        for i, p, w in zip(index, full, work):
            if i in kept:
                sparse.scatter_(p, kept[i], w)
        if h.weight_decay != 0:
            decay = 1.0 - h.lr * h.weight_decay * keep_float
            torch._foreach_mul_(full, decay if isinstance(decay, Number) else decay.to(ms[0].dtype))
        for p, f in zip(originals, full):
            if f is not p:
                p.copy_(f)


def _fused_spam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    mask_bits: list[Tensor | None],
    h: SpamStep,
    *,
    keep: Tensor | None,
    clip_counts: list[Tensor | None] | None,
    grad_scale: Tensor | None,
    num_warps: int | None = None,
) -> None:
    from . import fused

    unscale = inverse_scale(grad_scale)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if p.is_complex():
            raise RuntimeError("the fused SPAM step does not support complex parameters; use fused=False")
        by_device[p.device].append(i)
    for device, index in by_device.items():
        ks = [steps[i] for i in index]
        keep_float = torch.ones((), device=device) if keep is None else keep.to(device, torch.float32)
        if isinstance(h.reset, Tensor):  # capturable: decided on the device
            reset_float = h.reset.to(device, torch.float32)
            if h.bias_correction_reset:
                torch._foreach_mul_(ks, [1.0 - reset_float] * len(ks))
        else:
            reset_float = keep_float * 0 + float(h.reset)
            if h.reset and h.bias_correction_reset:
                torch._foreach_zero_(ks)
        # A list of 0-dim device tensors, not one tensor scalar: some backends read a tensor scalar back.
        torch._foreach_add_(ks, [keep_float] * len(ks))
        # Per-step decisions as device values (no host round trip), each passed to the kernel by name.
        threshold = h.threshold.to(device) if isinstance(h.threshold, Tensor) else h.threshold
        values = fused.StepValues(
            keep=keep_float,
            decay=1.0 - h.lr * h.weight_decay * keep_float,
            reset=reset_float,
            threshold=keep_float * 0 + threshold,
            unscale=keep_float * 0 + (1.0 if unscale is None else unscale.to(device)),
        )
        sizes = _step_sizes(ks, h, h.warmup_multiplier * keep_float.double(), torch.float32)
        counts: list[Tensor | None] | None = None if clip_counts is None else [None] * len(index)
        fused.fused_spam([params[i] for i in index], [grads[i] for i in index], [exp_avgs[i] for i in index],
                         [exp_avg_sqs[i] for i in index], list(sizes.unbind(0)), values,
                         [mask_bits[i] for i in index], beta1=h.beta1, beta2=h.beta2, eps=h.eps, density=h.density,
                         skip=keep is not None, maximize=h.maximize, clip_unseen=h.clip_unseen, clip_counts=counts,
                         num_warps=num_warps)
        if clip_counts is not None and (isinstance(h.threshold, Tensor) or h.threshold > 0):
            for k, i in enumerate(index):
                clip_counts[i] = counts[k]


def _native_spam(params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor], index: list[int],
                 mask_bits: list[Tensor | None], sizes: Tensor, scalars: Tensor,
                 clip_counts: list[Tensor | None] | None, counting: bool) -> set[int]:
    """Step the dense CPU tensors of ``index`` (positions ``k`` into ``ms``, ``vs`` and ``sizes``) that the
    native loop takes, one call per dtype (:mod:`.native`: the compiled kernel's bits); returns their ``k``."""
    from . import native

    if params[index[0]].device.type != "cpu" or not native.available():
        return set()
    by_dtype: dict[torch.dtype, list[int]] = defaultdict(list)
    for k, i in enumerate(index):
        if mask_bits[i] is None and native.eligible(real_view(params[i]), real_view(grads[i]), ms[k], vs[k]):
            by_dtype[ms[k].dtype].append(k)
    for ks in by_dtype.values():
        counts = native.spam_update([real_view(params[index[k]].detach()) for k in ks],
                                    [real_view(grads[index[k]]) for k in ks], [ms[k] for k in ks],
                                    [vs[k] for k in ks], sizes[ks], scalars, counting)
        if clip_counts is not None and counts is not None:
            for k, count in zip(ks, counts.unbind(0)):
                clip_counts[index[k]] = count
    return {k for ks in by_dtype.values() for k in ks}


def _compiled_spam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    mask_bits: list[Tensor | None],
    h: SpamStep,
    *,
    keep: Tensor | None,
    clip_counts: list[Tensor | None] | None,
    grad_scale: Tensor | None,
    kept_positions: list[Tensor | None],
) -> None:
    from . import compiled
    from .compiled import flat_view as flat

    unscale = inverse_scale(grad_scale)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        by_device[p.device].append(i)
    for device, index in by_device.items():
        ms = [real_view(exp_avgs[i]) for i in index]
        vs = [real_view(exp_avg_sqs[i]) for i in index]
        ks = [steps[i] for i in index]
        keep_float = torch.ones((), device=device) if keep is None else keep.to(device, torch.float32)
        if h.reset:
            torch._foreach_zero_(ms)
            torch._foreach_zero_(vs)
            if h.bias_correction_reset:
                torch._foreach_zero_(ks)
        torch._foreach_add_(ks, [keep_float] * len(ks))
        sizes = _step_sizes(ks, h, h.warmup_multiplier * keep_float.double(), torch.float64)
        factor = (1.0 if unscale is None else unscale.to(device).double()) * (-1.0 if h.maximize else 1.0)
        decay = 1.0 - h.lr * h.weight_decay * keep_float.double()
        values = [keep_float.double(), h.threshold, float(h.clip_unseen), factor, decay, 1.0 - h.beta1, 1.0 - h.beta2,
                  h.eps]
        scalars = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device).reshape(()) for x in values])
        sparse_scalars = scalars.clone()
        sparse_scalars[4] = 1.0  # a sparse parameter decays all its coordinates after the scatter
        counting = clip_counts is not None
        done = _native_spam(params, grads, ms, vs, index, mask_bits, sizes, scalars, clip_counts,
                            counting and (isinstance(h.threshold, Tensor) or h.threshold > 0))
        for k, i in enumerate(index):
            if k in done:
                continue
            # Detached, and a step size that is no view: the kernel is guarded on neither.
            param, m, v, grad = real_view(params[i].detach()), ms[k], vs[k], real_view(grads[i])
            if m.numel() == 0:  # nothing to update (an empty tensor, or a sparse one with nothing kept)
                if h.weight_decay != 0:
                    param.mul_(decay.to(param.dtype))
                continue
            size = sizes[k].clone()
            kernel = compiled.spam_kernel(counting, compiled.parallel(m.numel()))
            if mask_bits[i] is None:
                work, flat_m, flat_v = flat(param), flat(m), flat(v)
                clipped = kernel(work, flat(grad), flat_m, flat_v, size, scalars)
                compiled.write_back(((param, work), (m, flat_m), (v, flat_v)))
            elif param.dtype == m.dtype:  # the loop reads and writes the kept coordinates itself
                positions = kept_positions[i]
                if positions is None:
                    positions = sparse.kept_index(mask_bits[i], param.numel())
                work = flat(param)
                clipped = kernel(work, flat(grad), flat(m), flat(v), size, sparse_scalars, positions)
                if h.weight_decay != 0:
                    work.mul_(decay.to(work.dtype))
                compiled.write_back(((param, work),))
            else:  # half precision: update and decay in the moments' dtype, round once
                kept = _kept(mask_bits[i], kept_positions[i], param.numel())
                full = param.to(m.dtype)
                work = sparse.gather(full, kept)
                clipped = kernel(flat(work), sparse.gather(grad, kept), flat(m), flat(v), size, sparse_scalars)
                sparse.scatter_(full, kept, work)
                if h.weight_decay != 0:
                    full.mul_(decay.to(full.dtype))
                param.copy_(full)
            if clip_counts is not None and h.threshold > 0:
                clip_counts[i] = clipped


def spam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    mask_bits: list[Tensor | None],
    h: SpamStep,
    *,
    keep: Tensor | None,
    implementation: str = "forloop",
    clip_counts: list[Tensor | None] | None = None,
    grad_scale: Tensor | None = None,
    num_warps: int | None = None,
    kept_positions: list[Tensor | None] | None = None,
) -> None:
    """Functional SPAM step over parallel lists (see the module docstring for the math).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: parameters, their gradients (read only) and moments; for a
            sparse parameter the moments are the compact buffers of its kept coordinates.
        steps: per-parameter bias-correction counts ``k`` (0-dim float32 tensors, updated in place).
        mask_bits: per parameter, ``None`` (dense) or its packed bitmask of kept coordinates (:mod:`.sparse`).
        h: the group's hyperparameters and this step's decisions.
        keep: 0-dim boolean tensor, ``False`` to skip this step; ``None`` zeroes non-finite coordinates.
        implementation: ``"fused"`` (the Triton kernel, :mod:`.fused`), ``"compiled"`` (a ``torch.compile``
            loop per tensor, :mod:`.compiled`), ``"foreach"`` (multi-tensor) or ``"forloop"`` (the reference).
        clip_counts: optional list as long as ``params``; when clipping is active, entry ``i`` is set to a
            0-dim tensor counting the coordinates of parameter ``i`` clipped this step.
        grad_scale: the loss scale of ``torch.amp.GradScaler`` (1-element device tensor): gradients are
            divided by it inside the step, sparing a separate unscaling pass; ``None``: already unscaled.
        num_warps: the fused kernel's warps per program (``None``: its default); ignored by the others.
        kept_positions: optional, per parameter, the flat positions its ``mask_bits`` keeps (what
            :func:`.sparse.kept_index` finds, any integer dtype, kept by the caller between steps) or ``None``
            (found from the bits this step). The fused kernel reads the bits directly and ignores them.
    """
    arrays = (params, grads, exp_avgs, exp_avg_sqs, steps, mask_bits)
    options = dict(keep=keep, clip_counts=clip_counts, grad_scale=grad_scale)
    positions = [None] * len(params) if kept_positions is None else kept_positions
    if implementation == "fused":
        _fused_spam(*arrays, h, **options, num_warps=num_warps)
    elif implementation == "compiled":
        from .compiled import limits

        with limits():  # room for every dtype's kernel
            _compiled_spam(*arrays, h, **options, kept_positions=positions)
    elif implementation == "foreach":
        _multi_tensor_spam(*arrays, h, **options, kept_positions=positions)
    elif implementation == "forloop":
        _single_tensor_spam(*arrays, h, **options, kept_positions=positions)
    else:
        raise ValueError(f"Invalid implementation value: {implementation!r} (one of 'fused', 'compiled', 'foreach', "
                         "'forloop')")
