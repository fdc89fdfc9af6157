"""SPAM's per-tensor update as one ``torch.compile``-generated loop (C++ with vector instructions on the CPU,
a Triton kernel on CUDA): one read of ``p, g, m, v`` and one write of ``p, m, v`` per coordinate instead of
the dozen passes of the eager implementations.

The kernel sees only tensors: this step's learning rate, bias correction and warmup multiplier arrive folded
into a 0-dim ``step_size``, and θ, the skip flag, the decay factor, the loss-scale inverse and the betas in
one small ``scalars`` tensor, so no schedule, group or hyperparameter changes the compiled code. It is
compiled once for every tensor size (``dynamic=True``) per dtype and per build (one-thread below
``PARALLEL_MIN_NUMEL`` elements, multi-threaded above), twice if clip counts are asked for (telemetry).
Resets zero the moments before the kernel (once per period). For a sparse parameter the loop runs over its
compact moments and reads and writes the parameter at the kept positions itself (indexed loads and stores in
the generated loop), so no gathered copy of the parameter or the gradient is made.
"""

from __future__ import annotations

import functools
import shutil
from typing import Any

import torch
from torch import Tensor

from .stabilize import norm_scale

__all__ = ["compiled_available", "spam_kernel", "stable_spam_kernel", "parallel", "flat_view", "write_back",
           "limits"]


@functools.cache
def compiled_available(device_type: str) -> bool:
    """``torch.compile`` can build kernels here: a C++ compiler on the CPU, Triton on CUDA."""
    if device_type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    if device_type == "cuda":
        from .fused import fused_available

        return fused_available(torch.device("cuda"))
    return False


def flat_view(t: Tensor) -> Tensor:
    """A 1-D tensor over ``t``'s memory to update in place, made with ``set_`` rather than as a view so that a
    compiled kernel is guarded on no base tensor's shape (a contiguous copy, written back by the caller,
    when ``t`` is not contiguous)."""
    if not t.is_contiguous():
        return t.reshape(-1).clone()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),))


def write_back(pairs: tuple[tuple[Tensor, Tensor], ...]) -> None:
    """Copy each updated ``flat_view`` buffer into its ``(target, buffer)`` target when it was a copy (the
    target was not contiguous)."""
    for target, buffer in pairs:
        if buffer.data_ptr() != target.data_ptr():
            target.copy_(buffer.view_as(target))


def _update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_size: Tensor,
            scalars: Tensor, kept: Tensor | None = None, *, count: bool) -> Tensor | None:
    """In place on 1-D ``param`` (any float dtype; updated in the moments' dtype and rounded once),
    ``exp_avg``, ``exp_avg_sq``; returns the number of clipped coordinates when ``count``.

    With ``kept`` (a sparse parameter: the flat positions of its kept coordinates, any integer dtype, one per
    entry of the compact moments) the loop runs over the moments and reads ``param`` and ``grad`` at those
    positions and writes ``param`` back there: the gather and scatter happen inside the compiled loop, and the
    other coordinates are not touched (their decay is the caller's).

    ``scalars`` (float64) holds, in order: keep (0 skips the step), θ (0: no clipping this step), clip
    coordinates with v = 0 (1) or not (0), the gradient's factor (loss-scale inverse, negated to maximise),
    the decay factor, 1 − β1, 1 − β2 (taken in float64: 1 − β2 in float32 is 1.3e-5 off for β2 = 0.999),
    ε. Non-finite gradient coordinates count as 0 (a step with any is skipped
    through keep when the optimizer skips them)."""
    dtype = exp_avg.dtype
    keep, threshold, clip_unseen = scalars[:3].unbind(0)
    # Clipping as a clamp to ±bound (min and max: no masks to blend). θ = 0 (no clipping) is an infinite bound,
    # and so is v = 0 unless such coordinates are clipped (to 0, when clipping is in force); both chosen once, on
    # scalars.
    theta = torch.where(threshold > 0, threshold, float("inf")).to(dtype)
    unseen = torch.where((clip_unseen > 0) & (threshold > 0), 0.0, float("inf")).to(dtype)
    keep, factor, decay, one_minus_beta1, one_minus_beta2, eps = scalars[[0, 3, 4, 5, 6, 7]].to(dtype).unbind(0)
    grad = (grad if kept is None else grad[kept]).to(dtype)
    # |g| < inf is False for NaN and ±Inf: one vector compare (nan_to_num's isnan is a scalar loop on the CPU).
    g = torch.where((grad.abs() < float("inf")) & (keep > 0), grad, 0.0) * factor
    bound = torch.where(exp_avg_sq == 0, unseen, (exp_avg_sq * theta).sqrt())
    clipped = torch.minimum(torch.maximum(g, -bound), bound)
    m = exp_avg * (1.0 - one_minus_beta1 * keep) + one_minus_beta1 * clipped
    v = exp_avg_sq * (1.0 - one_minus_beta2 * keep) + one_minus_beta2 * clipped * clipped
    p = ((param if kept is None else param[kept]).to(dtype) + m * (step_size / (v.sqrt() + eps))) * decay
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if kept is None:
        param.copy_(p)
    else:
        param.index_put_((kept,), p.to(param.dtype))
    return (g.abs() > bound).sum() if count else None


def _counting(*args: Tensor) -> Tensor | None:
    return _update(*args, count=True)


def _plain(*args: Tensor) -> None:
    _update(*args, count=False)


def _ema(average: Tensor, value: Tensor, gamma: Tensor, keep: Tensor) -> Tensor:
    """``γ·average + (1 − γ)·value`` where ``keep`` is 1, ``average`` where it is 0; float64, rounded once."""
    return (average.double() * (1.0 - (1.0 - gamma) * keep) + (1.0 - gamma) * keep * value.double()).to(average.dtype)


#: Each float dtype's largest finite value, for a finiteness test written as two comparisons.
_MAX = {dtype: torch.finfo(dtype).max for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


def _stable_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_ema: Tensor,
                   norm_ema: Tensor, norm_sq_ema: Tensor, scalars: Tensor, corrections: Tensor, *,
                   adaclip: str, adagn: bool, peak_given: bool) -> None:
    """Stable-SPAM's per-tensor step (:mod:`spamopt.optim.stable_functional` states the math) in place on
    1-D ``param`` and the moments, and on the 1-element statistics ``max_ema`` (M), ``norm_ema`` (a) and
    ``norm_sq_ema`` (b). A reset has zeroed ``m, v, k`` already; the caller advances the counters k and n.
    (Inside the kernel, a kernel compiled on one thread wrote them from every thread of a later multi-threaded
    call, advancing them once per thread.)

    ``scalars`` (float64) holds, in order: keep (0 skips the step), the gradient's factor (loss-scale inverse,
    negated to maximise), the decay factor 1 − lr·wd·keep, γ1·σ, γ2, γ3, β1·σ, β2, ε, lr; ``corrections``
    (float64) this step's debiasing denominators with the counts k + keep and n + keep: 1 − γ1^n, 1 − γ2^n,
    1 − γ3^n, 1 − β1^k and sqrt(1 − β2^k). They come in computed (once per step for every tensor): inside the
    kernel the C++ backend would raise each power again for every vector of coordinates. Its last entry is
    max|g| when ``peak_given`` (found by the non-finite check that decided keep, exact wherever keep is 1:
    the kernel then makes one pass over the gradient fewer), otherwise unused."""
    dtype = exp_avg.dtype
    keep, factor, decay, gamma1, gamma2, gamma3, beta1, beta2, eps, lr = scalars.unbind(0)
    c1, c2, c3, bias1, sqrt_bias2, peak = corrections.unbind(0)
    # The gradient is read by up to three loops (its largest coordinate, AdaGN's norm, the update), and each
    # computes it from ``grad`` itself, with its own finiteness test. Were it one expression, the compiler would
    # store it in a temporary of the tensor's size for the later loops (its threshold for storing shared values
    # is 1, for the scalars' sake), and a fresh temporary that large costs a page fault per 4 KiB on every call:
    # 2-4x the kernel's time on an 8M-element tensor. For the same reason each later reading depends on the
    # loop before it through a condition that always holds (``~(x < 0)`` for x ≥ 0 or NaN): the scheduler puts
    # a stored value in the first loop that can compute it, and would compute the update's gradient in an
    # earlier loop and store it for the update's.
    if peak_given:  # NaN or inf where keep is 0
        largest = torch.where(keep > 0, peak, 0.0).to(dtype)
    else:
        finite = (grad >= -_MAX[grad.dtype]) & (grad <= _MAX[grad.dtype])
        largest = torch.where(finite, grad, 0.0).to(dtype).abs().amax()
    # max|g·f| = max|g|·|f| exactly: rounding is monotone.
    mu = largest * (factor.abs() * keep).to(dtype)  # also bounds max|g| after clipping: the norm's scale
    ready = (keep > 0) & ~(mu < 0)
    full = param.to(dtype) * decay.to(dtype)
    bound = mu  # read only when AdaClip is on
    if adaclip != "off":
        m_max = _ema(max_ema, mu, gamma3, keep)
        bound = (m_max / c3.to(m_max.dtype)).to(dtype)
        max_ema.copy_(m_max)

    def clip(x: Tensor) -> Tensor:
        if adaclip == "off":
            return x
        clipped = x * (bound / mu) if adaclip == "scale" else torch.sign(x) * bound
        return torch.where(x.abs() > bound, clipped, x)

    if adagn:
        finite = (grad < float("inf")) & (grad > -float("inf")) & ready
        g_norm = clip(torch.where(finite, grad, 0.0).to(dtype) * factor.to(dtype))
        scale = norm_scale(mu)
        r = (torch.linalg.vector_norm(g_norm * scale).double() / scale.double()).to(norm_ema.dtype)
        ready = ready & ~(r < 0)
        a = _ema(norm_ema, r, gamma1, keep)
        b = _ema(norm_sq_ema, r * r, gamma2, keep)
        target = a / c1.to(a.dtype) / ((b / c2.to(b.dtype)).sqrt() + eps.to(b.dtype))
        ratio = torch.where(r > 0, target / r, 1.0).to(dtype)
        norm_ema.copy_(a)
        norm_sq_ema.copy_(b)
    g = clip(torch.where((grad.abs() < float("inf")) & ready, grad, 0.0).to(dtype) * factor.to(dtype))
    if adagn:
        g = g * ratio
    m = exp_avg * (1.0 - (1.0 - beta1) * keep).to(dtype) + (1.0 - beta1).to(dtype) * g
    v = exp_avg_sq * (1.0 - (1.0 - beta2) * keep).to(dtype) + (1.0 - beta2).to(dtype) * g * g
    step_size = (-lr * keep / bias1).to(dtype)
    denominator = v.sqrt() / sqrt_bias2.to(dtype) + eps.to(dtype)
    param.copy_(full + m * step_size / denominator)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


# Each kernel is compiled once per dtype and once more for 1-element tensors (the compiler specialises sizes
# 0 and 1), in two builds (threads): up to 20 versions for float32/bfloat16/float16/float64 parameters, above
# dynamo's default limit of 8. Stable-SPAM's AdaClip/AdaGN variants (up to 6) share one code object, so its
# cache may hold six times that.
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
RECOMPILE_LIMIT = 128


# One kernel serves every tensor size, but the C++ backend decides whether its loops run on several threads
# from the size it was first compiled for (and its on-disk cache hands that decision to later processes):
# first compiled for a 100-element bias, it stepped 16M-element embeddings on one thread. So each kernel has
# two builds: one thread for tensors under PARALLEL_MIN_NUMEL elements, where starting threads costs more than
# it saves (torch's own operators draw the line at 32K elements), and one that always keeps the parallel loop,
# with OpenMP choosing the thread count at run time.
PARALLEL_MIN_NUMEL = 1 << 16
# Inductor inlines a cheap computation into every loop that reads it, so the per-tensor scalars (AdaClip's
# bound, AdaGN's power-of-two scale and norm ratio: frexp, ldexp, square roots, float64 divisions) were
# recomputed in every vector iteration of the loops over the coordinates. A threshold of 1 stores them once
# and the loops load them: the same arithmetic, 1.5x faster for Stable-SPAM (benchmarks/compiled_scalars.py).
_STORE_SCALARS = {"realize_opcount_threshold": 1}
_OPTIONS = {False: {"cpp.threads": 1, **_STORE_SCALARS}, True: {"cpp.dynamic_threads": True, **_STORE_SCALARS}}


def parallel(numel: int) -> bool:
    """Whether a tensor of ``numel`` elements takes the kernels' multi-threaded build."""
    return numel >= PARALLEL_MIN_NUMEL


@functools.cache
def spam_kernel(count: bool, threaded: bool = True) -> Any:
    """The compiled update, with or without the clip count (two functions, so two caches), in its one-thread or
    multi-threaded build (:func:`parallel` chooses), built on first use; call it inside :func:`limits`. A
    sparse parameter's call passes its kept positions as a seventh argument (compiled once more)."""
    update = _counting if count else _plain
    return torch.compile(update, dynamic=True, fullgraph=True, options=_OPTIONS[threaded])


@functools.cache
def stable_spam_kernel(adaclip: str, adagn: bool, threaded: bool = True, peak_given: bool = False) -> Any:
    """Stable-SPAM's compiled step for one choice of AdaClip's mode and AdaGN (each its own kernel, so an
    ablation computes nothing it does not use), one-thread or multi-threaded, finding max|g| itself or reading
    it (``peak_given``); call it inside :func:`limits`."""
    def update(*args: Tensor) -> None:
        _stable_update(*args, adaclip=adaclip, adagn=adagn, peak_given=peak_given)

    return torch.compile(update, dynamic=True, fullgraph=True, options=_OPTIONS[threaded])


def limits() -> Any:
    """The context the kernels run in: room for every dtype's version."""
    return torch._dynamo.config.patch(**{_LIMIT: max(RECOMPILE_LIMIT, getattr(torch._dynamo.config, _LIMIT))})
