r"""Stable-SPAM's update, written once per implementation: a for-loop reference, a multi-tensor (foreach) path
and a compiled one (one ``torch.compile`` function per tensor, :mod:`.compiled`), tested to agree. The caller
(:class:`spamopt.StableSPAM`) passes this step's decisions (reset or not, the momentum multiplier σ) as plain
values; the skip flag and every statistic stay on the device.

For each parameter, with ``g`` a private fp32 (or float64) copy of its gradient, unscaled when a
``torch.amp.GradScaler`` scaled the loss (``p.grad`` is never written)::

    p ← p · (1 − lr·wd)                                        decoupled weight decay, first
    n ← n + 1;  g ← AdaClip(g);  g ← AdaGN(g) with γ1·σ          (:mod:`.stabilize`)
    if reset:  m, v, k ← 0, 0, 0                                  MoRet, before the update
    k ← k + 1;  β1' = β1·σ
    m ← β1'·m + (1 − β1')·g;  v ← β2·v + (1 − β2)·g²
    p ← p − lr / (1 − β1'^k) · m / (sqrt(v) / sqrt(1 − β2^k) + ε)

``reference_compat``: one counter ``c`` (``k``) drives every bias correction; a reset sets ``c = 1`` and takes
effect one step late: the reset step still updates and uses the old ``m, v`` with ``c = 1`` bias corrections,
then stores zeros. ``keep`` = 0 (a skipped step) multiplies every change away, except the reset, which belongs
to the clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import buckets_by_device_and_dtype, gradient_copy, inverse_scale, keep_on, real_view
from .stabilize import adaclip_, adagn_, debias_correction, stabilize_shards_

__all__ = ["StableStep", "stable_spam", "COMPAT_NOT_COMPILED"]

COMPAT_NOT_COMPILED = ("Invalid compiled value: True with reference_compat=True (the reference's late reset runs on "
                       "the for-loop and foreach paths only)")


@dataclass(frozen=True)
class StableStep:
    """One parameter group's hyperparameters and this step's decisions (``gamma1`` already times σ)."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    gamma1: float
    gamma2: float
    gamma3: float
    sigma: float
    reset: bool
    adaclip: str
    adagn: bool
    maximize: bool
    reference_compat: bool
    shard_group: Any = None  # FSDP2: the process group the tensors are sharded over (statistics over it)


def _stabilize(g: Tensor, stats: dict[str, Tensor], counter: Tensor, h: StableStep, keep: float | Tensor) -> None:
    counter.add_(keep)
    peak = None
    if h.adaclip != "off":
        peak = adaclip_(g, stats["max_ema"], counter, h.gamma3, keep, h.adaclip)
    if h.adagn:
        adagn_(g, stats["norm_ema"], stats["norm_sq_ema"], counter, h.gamma1, h.gamma2, h.eps, keep, peak)


def _bias_corrections(k: Tensor, h: StableStep) -> tuple[Tensor, Tensor]:
    """``(1 − β1'^k, sqrt(1 − β2^k))`` in float64 (``k`` clamped to 1: a skipped first step gives 0/0)."""
    k = k.to(torch.float64).clamp(min=1.0)
    return 1.0 - torch.pow(h.beta1 * h.sigma, k), (1.0 - torch.pow(h.beta2, k)).sqrt()


def _reset_first(m: list[Tensor], v: list[Tensor], k: list[Tensor], h: StableStep) -> None:
    """MoRet before the update (default), or the reference's counter reset to 1 (its moments later)."""
    if not h.reset:
        return
    if h.reference_compat:
        torch._foreach_zero_(k)
        torch._foreach_add_(k, 1.0)
    else:
        torch._foreach_zero_(m)
        torch._foreach_zero_(v)
        torch._foreach_zero_(k)


def _single_tensor_stable_spam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                               exp_avg_sqs: list[Tensor], steps: list[Tensor], statistics: list[dict[str, Tensor]],
                               h: StableStep, *, keep: Tensor | None, grad_scale: Tensor | None) -> None:
    unscale = inverse_scale(grad_scale)
    beta1 = h.beta1 * h.sigma
    for param, grad, m, v, k, stats in zip(params, grads, exp_avgs, exp_avg_sqs, steps, statistics):
        param, grad, m, v = real_view(param), real_view(grad), real_view(m), real_view(v)
        keep_here, keep_float = keep_on(keep, param.device)
        g = gradient_copy(grad, None, keep_here, h.maximize, m.dtype, unscale)
        full = param.to(m.dtype)  # half-precision params: update in fp32, round once at the end
        if h.weight_decay != 0:
            full.mul_(1.0 - h.lr * h.weight_decay * keep_float)
        _stabilize(g, stats, k if h.reference_compat else stats["stat_step"], h, keep_float)

        _reset_first([m], [v], [k], h)
        if not h.reference_compat:
            k.add_(keep_float)
        m.mul_(1.0 - (1.0 - beta1) * keep_float).add_(g, alpha=1.0 - beta1)
        v.mul_(1.0 - (1.0 - h.beta2) * keep_float).addcmul_(g, g, value=1.0 - h.beta2)
        correction1, correction2 = _bias_corrections(k, h)
        step_size = (-h.lr * keep_float / correction1).to(m.dtype)
        denominator = v.sqrt().div_(correction2.to(m.dtype)).add_(h.eps)
        full.addcdiv_(m.mul(step_size), denominator)
        if h.reset and h.reference_compat:  # the reference stores the fresh zeros after using the old moments
            m.zero_()
            v.zero_()
        if full is not param:
            param.copy_(full)


def _multi_tensor_stable_spam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                              exp_avg_sqs: list[Tensor], steps: list[Tensor], statistics: list[dict[str, Tensor]],
                              h: StableStep, *, keep: Tensor | None, grad_scale: Tensor | None) -> None:
    unscale = inverse_scale(grad_scale)
    beta1 = h.beta1 * h.sigma
    reals = [real_view(p) for p in params]
    for (device, _), index in buckets_by_device_and_dtype(reals).items():
        keep_here, keep_float = keep_on(keep, device)
        originals = [reals[i] for i in index]
        ms = [real_view(exp_avgs[i]) for i in index]
        vs = [real_view(exp_avg_sqs[i]) for i in index]
        ks = [steps[i] for i in index]
        full = [p.to(m.dtype) for p, m in zip(originals, ms)]
        gs = [gradient_copy(real_view(grads[i]), None, keep_here, h.maximize, m.dtype, unscale)
              for i, m in zip(index, ms)]
        if h.weight_decay != 0:
            decay = 1.0 - h.lr * h.weight_decay * keep_float
            torch._foreach_mul_(full, decay if isinstance(decay, float) else decay.to(ms[0].dtype))
        counters = [k if h.reference_compat else statistics[i]["stat_step"] for i, k in zip(index, ks)]
        if h.shard_group is None:
            for g, i, counter in zip(gs, index, counters):  # per-tensor statistics: 0-dim work, two passes over g
                _stabilize(g, statistics[i], counter, h, keep_float)
        else:
            stabilize_shards_(gs, [statistics[i] for i in index], counters, gamma1=h.gamma1, gamma2=h.gamma2,
                              gamma3=h.gamma3, eps=h.eps, keep=keep_float, adaclip=h.adaclip, adagn=h.adagn,
                              group=h.shard_group)

        _reset_first(ms, vs, ks, h)
        if not h.reference_compat:
            torch._foreach_add_(ks, keep_float if isinstance(keep_float, float) else [keep_float.float()] * len(ks))
        torch._foreach_mul_(ms, 1.0 - (1.0 - beta1) * keep_float)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, 1.0 - (1.0 - h.beta2) * keep_float)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - h.beta2)
        del gs
        corrections = [_bias_corrections(k, h) for k in ks]
        denominators = torch._foreach_sqrt(vs)
        torch._foreach_div_(denominators, [c2.to(m.dtype) for (_, c2), m in zip(corrections, ms)])
        torch._foreach_add_(denominators, h.eps)
        updates = torch._foreach_mul(ms, [(-h.lr * keep_float / c1).to(m.dtype) for (c1, _), m in zip(corrections, ms)])
        torch._foreach_addcdiv_(full, updates, denominators)
        if h.reset and h.reference_compat:
            torch._foreach_zero_(ms)
            torch._foreach_zero_(vs)
        for p, f in zip(originals, full):
            if f is not p:
                p.copy_(f)


def _native_stable_spam(reals: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                        statistics: list[dict[str, Tensor]], index: list[int], scalars: Tensor, table: Tensor,
                        h: StableStep, peak_given: bool) -> set[int]:
    """Step the CPU tensors of ``index`` (positions into ``ms``, ``vs`` and the rows of ``table``) that the
    native loop takes, one call per dtype (:mod:`.native`); returns their positions."""
    from . import native

    if reals[index[0]].device.type != "cpu" or not native.available():
        return set()
    by_dtype: dict[torch.dtype, list[int]] = {}
    for position, i in enumerate(index):
        stats = [statistics[i][key] for key in ("max_ema", "norm_ema", "norm_sq_ema")]
        if native.eligible(reals[i], real_view(grads[i]), ms[position], vs[position]) and all(
                s.dtype == torch.float64 and s.numel() == 1 for s in stats):
            by_dtype.setdefault(ms[position].dtype, []).append(position)
    for positions in by_dtype.values():
        native.stable_spam_update([reals[index[k]].detach() for k in positions],
                                  [real_view(grads[index[k]]) for k in positions], [ms[k] for k in positions],
                                  [vs[k] for k in positions], [statistics[index[k]] for k in positions], scalars,
                                  table[positions], adaclip=h.adaclip, adagn=h.adagn, peak_given=peak_given)
    return {k for positions in by_dtype.values() for k in positions}


def _compiled_stable_spam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                          exp_avg_sqs: list[Tensor], steps: list[Tensor], statistics: list[dict[str, Tensor]],
                          h: StableStep, *, keep: Tensor | None, grad_scale: Tensor | None,
                          peaks: list[Tensor | None] | None) -> None:
    from . import compiled

    if h.reference_compat:
        raise ValueError(COMPAT_NOT_COMPILED)
    unscale = inverse_scale(grad_scale)
    reals = [real_view(p) for p in params]
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(reals):
        by_device.setdefault(p.device, []).append(i)
    for device, index in by_device.items():
        empty = [i for i in index if reals[i].numel() == 0]  # no coordinates to compile for; statistics still move
        if empty:
            _single_tensor_stable_spam(*([array[i] for i in empty] for array in (
                params, grads, exp_avgs, exp_avg_sqs, steps, statistics)), h, keep=keep, grad_scale=grad_scale)
        index = [i for i in index if reals[i].numel()]
        if not index:
            continue
        ms = [real_view(exp_avgs[i]) for i in index]
        vs = [real_view(exp_avg_sqs[i]) for i in index]
        _reset_first(ms, vs, [steps[i] for i in index], h)
        keep_float = torch.ones((), dtype=torch.float64, device=device) if keep is None else keep.to(device,
                                                                                                   torch.float64)
        factor = (1.0 if unscale is None else unscale.to(device).double()) * (-1.0 if h.maximize else 1.0)
        values = [keep_float, factor, 1.0 - h.lr * h.weight_decay * keep_float, h.gamma1, h.gamma2, h.gamma3,
                  h.beta1 * h.sigma, h.beta2, h.eps, h.lr]
        scalars = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device).reshape(()) for x in values])
        # This step's counts for every tensor at once, and the debiasing denominators the kernel takes.
        k = torch.stack([steps[i].double().reshape(()) for i in index]) + keep_float
        n = torch.stack([statistics[i]["stat_step"].double().reshape(()) for i in index]) + keep_float
        # Each tensor's max|g| when the non-finite check has found them (exact wherever the step is kept; the
        # kernel reads them instead of finding them), else NaN and the kernel finds them.
        given = keep is not None and peaks is not None and all(peaks[i] is not None for i in index)
        peak = (torch.stack([peaks[i] for i in index]).double() if given  # type: ignore[misc]
                else torch.full((len(index),), float("nan"), dtype=torch.float64, device=device))
        table = torch.stack([debias_correction(h.gamma1, n), debias_correction(h.gamma2, n),
                             debias_correction(h.gamma3, n), *_bias_corrections(k, h), peak], dim=1)
        done = _native_stable_spam(reals, grads, ms, vs, statistics, index, scalars, table, h, given)
        for position, (i, m, v, row) in enumerate(zip(index, ms, vs, table.unbind(0))):
            if position in done:
                continue
            param, stats = reals[i].detach(), statistics[i]
            work, flat_m, flat_v = compiled.flat_view(param), compiled.flat_view(m), compiled.flat_view(v)
            # The 0-dim statistics go in as 1-element tensors: torch.compile drops in-place writes to 0-dim
            # float64 CPU inputs (torch 2.13), which float64 parameters' statistics are.
            counters = [compiled.flat_view(stats[key]) for key in ("max_ema", "norm_ema", "norm_sq_ema")]
            kernel = compiled.stable_spam_kernel(h.adaclip, h.adagn, compiled.parallel(m.numel()), given)
            # A row that is no view (clone): the kernel is guarded on no base tensor.
            kernel(work, compiled.flat_view(real_view(grads[i])), flat_m, flat_v, *counters, scalars, row.clone())
            compiled.write_back(((param, work), (m, flat_m), (v, flat_v)))
        for counter in [steps[i] for i in index] + [statistics[i]["stat_step"] for i in index]:
            counter.add_(keep_float.to(counter.dtype))


def stable_spam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                steps: list[Tensor], statistics: list[dict[str, Tensor]], h: StableStep, *, keep: Tensor | None,
                implementation: str = "forloop", grad_scale: Tensor | None = None,
                peaks: list[Tensor | None] | None = None) -> None:
    """Functional Stable-SPAM step over parallel lists (module docstring for the math).

    ``steps`` are the Adam counts ``k`` (0-dim tensors, updated in place); ``statistics[i]`` holds parameter
    ``i``'s ``stat_step`` (n; absent in ``reference_compat``, where ``k`` is the one counter), ``max_ema``,
    ``norm_ema`` and ``norm_sq_ema``. ``keep``: 0-dim boolean, False to skip; None counts non-finite
    coordinates as zero. ``implementation``: ``"compiled"``, ``"foreach"`` or ``"forloop"``. ``peaks``: each
    gradient's ``max|g|`` as found by the step's non-finite check (:func:`spamopt.optim.base.finite_peaks`) that
    decided ``keep``, or None; the compiled implementation reads them instead of finding them again.
    """
    arrays = (params, grads, exp_avgs, exp_avg_sqs, steps, statistics)
    if h.shard_group is not None:  # shards: the statistics are reduced over every tensor of the group at once
        implementation = "foreach"
    if implementation == "compiled":
        from .compiled import limits

        with limits():  # room for every dtype's kernel
            _compiled_stable_spam(*arrays, h, keep=keep, grad_scale=grad_scale, peaks=peaks)
    elif implementation == "foreach":
        _multi_tensor_stable_spam(*arrays, h, keep=keep, grad_scale=grad_scale)
    elif implementation == "forloop":
        _single_tensor_stable_spam(*arrays, h, keep=keep, grad_scale=grad_scale)
    else:
        raise ValueError(f"Invalid implementation value: {implementation!r} (StableSPAM: 'compiled', 'foreach' or "
                         "'forloop')")


def momentum_multiplier(step: int, total_steps: int | None, eta_min: float, clamp: bool = True) -> float:
    """σ_τ = η + (1 − η)·(1 + cos(π·min(τ, T)/(T + 1)))/2 (1 without a schedule); ``clamp=False`` lets τ pass T,
    where the reference's σ rises again."""
    if total_steps is None:
        return 1.0
    tau = min(step, total_steps) if clamp else step
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * tau / (total_steps + 1))) / 2.0
