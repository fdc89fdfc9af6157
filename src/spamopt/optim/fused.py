r"""SPAM's fused step: one Triton kernel reads ``p, g, m, v`` once and writes ``p, m, v`` once.

The math is the module docstring of :mod:`spamopt.optim.functional`, in the same order, with every
intermediate in float32: clip, moment update (after an optional reset), bias-corrected and warmup-scaled
update, decoupled weight decay.

Many tensors per launch: each program handles one *chunk* of ``CHUNK = 4096`` consecutive elements of one
tensor; a cached table maps program ids to (tensor, first element), and per-tensor tables hold the tensors'
addresses. One launch covers every tensor of a (device, dtype, dense/sparse) bucket.

When every address of a bucket is 16-byte aligned and every length a multiple of 8 (true of any LLaMA
tensor), the kernel is told so (``ALIGNED``) and moves ``p, g, m, v`` in 128-bit accesses: the compiled
dense fp32 kernel reads 16 and writes 12 bytes per element, nothing else but a few scalars per program.

Sparse momentum reads the bitmask directly. ``CHUNK`` equals the sampling stratum of :mod:`.sparse`, in which
exactly ``K = round(d·4096)`` coordinates are kept, so the compact index of a kept coordinate is
``stratum · K + (its rank among the kept coordinates of its stratum)`` — a prefix sum inside the program:
no boolean mask, no index array, no full-size temporary.

Nothing here waits for the device: this step's values (:class:`StepValues`: the skip flag, the
weight-decay factor, the reset flag, the clip threshold in force and the gradients' unscaling factor
``1 / grad_scale`` of ``torch.amp.GradScaler``) reach the kernel as 0-dim device tensors, each by name, and
the step sizes as a device vector.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .sparse import STRATUM, kept_per_stratum

__all__ = ["CHUNK", "NUM_WARPS", "StepValues", "fused_available", "fused_spam"]

CHUNK = STRATUM  # elements per program; must equal the sparse stratum (see the module docstring)
VECTOR_BYTES = 16  # widest global access; a bucket uses it when every address is a multiple of this
VECTOR_ELEMENTS = 8  # ... and every tensor's length a multiple of this (16 bytes of a 2-byte type)
NUM_WARPS = 8  # 4, 8 and 16 within 10 % on an H200 (BENCHMARKS.md); sm_90 aligned: 121 registers dense fp32, 190 sparse
_TABLE_CACHE_SIZE = 32
# Round every operation as torch's eager ops do. Triton's defaults on NVIDIA GPUs are approximate: `tl.sqrt` is
# sqrt.approx.ftz (a subnormal v becomes 0, hence a clipping bound of 0) and `/` is div.full (2 ulp), and
# ptxas contracts a * b + c into one FMA. Measured on an H200 with those defaults, the fused moments drifted
# 1.3e-5 (relative) from the for-loop's over twelve steps. The step is memory-bound: exact rounding costs no time.
COMPILE_OPTIONS = {"enable_fp_fusion": False}

try:
    import triton
    import triton.language as tl
except ImportError:  # the fused path is optional
    triton = None


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_available(device: torch.device) -> bool:
    """Whether :func:`fused_spam` can run on ``device``."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    _ALIGNMENT = tl.constexpr(VECTOR_BYTES)
    _LENGTH_MULTIPLE = tl.constexpr(VECTOR_ELEMENTS)

    @triton.jit
    def _round_to_bfloat16(x):
        """float32 → bfloat16, round to nearest even, written out: Triton's interpreter truncates instead."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _spam_kernel(
        param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, mask_ptrs,  # int64 address per tensor
        chunk_tensor, chunk_start, numels,  # program → (tensor, first element); elements per tensor
        step_sizes,  # float32 per tensor: −lr · s · keep · sqrt(1 − β2^k) / (1 − β1^k)
        keep_ptr, decay_ptr, reset_ptr, threshold_ptr, unscale_ptr,  # 0-dim float32 each: see StepValues
        clip_counts,  # int32 per tensor, incremented when COUNT_CLIPS
        beta1, beta2, eps, kept_per_stratum,
        PARAM: tl.constexpr, GRAD: tl.constexpr, MOMENT: tl.constexpr,
        SPARSE: tl.constexpr, SKIP: tl.constexpr, MAXIMIZE: tl.constexpr, COUNT_CLIPS: tl.constexpr,
        CLIP_UNSEEN: tl.constexpr,
        ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    ):
        program = tl.program_id(0)
        tensor = tl.load(chunk_tensor + program)
        start = tl.multiple_of(tl.load(chunk_start + program), BLOCK)
        numel = tl.load(numels + tensor)
        p_ptr = tl.load(param_ptrs + tensor).to(tl.pointer_type(PARAM))
        g_ptr = tl.load(grad_ptrs + tensor).to(tl.pointer_type(GRAD))
        m_ptr = tl.load(exp_avg_ptrs + tensor).to(tl.pointer_type(MOMENT))
        v_ptr = tl.load(exp_avg_sq_ptrs + tensor).to(tl.pointer_type(MOMENT))
        if ALIGNED:
            # Addresses read from a table carry no alignment the compiler can see: state it (the host checked
            # it), so that loads and stores become 128-bit vector accesses.
            p_ptr, g_ptr = tl.multiple_of(p_ptr, _ALIGNMENT), tl.multiple_of(g_ptr, _ALIGNMENT)
            m_ptr, v_ptr = tl.multiple_of(m_ptr, _ALIGNMENT), tl.multiple_of(v_ptr, _ALIGNMENT)
            numel = tl.multiple_of(numel, _LENGTH_MULTIPLE)

        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < numel
        if SPARSE:
            bits_ptr = tl.load(mask_ptrs + tensor).to(tl.pointer_type(tl.uint8))
            byte = tl.load(bits_ptr + offsets // 8, mask=inside, other=0)
            lane = inside & (((byte >> (offsets % 8).to(tl.uint8)) & 1) != 0)
            rank = tl.cumsum(lane.to(tl.int32), 0) - 1
            moment_index = (start // BLOCK) * kept_per_stratum + rank
        else:
            lane = inside
            moment_index = offsets

        keep = tl.load(keep_ptr)
        decay = tl.load(decay_ptr)
        reset = tl.load(reset_ptr)
        threshold = tl.load(threshold_ptr)
        unscale = tl.load(unscale_ptr)

        g = tl.load(g_ptr + offsets, mask=lane, other=0.0).to(tl.float32)
        finite = (g == g) & (tl.abs(g) != float("inf"))
        if SKIP:
            g = tl.where(keep != 0.0, g, 0.0)  # a skipped step (non-finite somewhere) moves nothing
        else:
            g = tl.where(finite, g, 0.0)  # non-finite coordinates count as zero
        g = g * unscale
        if MAXIMIZE:
            g = -g
        m = tl.load(m_ptr + moment_index, mask=lane, other=0.0).to(tl.float32) * (1.0 - reset)
        v = tl.load(v_ptr + moment_index, mask=lane, other=0.0).to(tl.float32) * (1.0 - reset)

        bound = tl.sqrt_rn(v * threshold)
        if not CLIP_UNSEEN:  # v = 0: no history to call g a spike against
            bound = tl.where(v > 0.0, bound, float("inf"))
        clipping = threshold > 0.0
        if COUNT_CLIPS:
            clipped = tl.sum((lane & (tl.abs(g) > bound)).to(tl.int32), 0)
            tl.atomic_add(clip_counts + tensor, tl.where(clipping, clipped, 0))
        g = tl.where(clipping, tl.minimum(tl.maximum(g, -bound), bound), g)

        m = m * (1.0 - (1.0 - beta1) * keep) + (1.0 - beta1) * g
        v = v * (1.0 - (1.0 - beta2) * keep) + (1.0 - beta2) * g * g
        p = tl.load(p_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        step_size = tl.load(step_sizes + tensor)
        p = tl.where(lane, p + tl.div_rn(step_size * m, tl.sqrt_rn(v) + eps), p) * decay
        if PARAM == tl.bfloat16:
            p_out = _round_to_bfloat16(p)
        else:
            p_out = p.to(PARAM)
        tl.store(p_ptr + offsets, p_out, mask=inside)
        tl.store(m_ptr + moment_index, m.to(MOMENT), mask=lane)
        tl.store(v_ptr + moment_index, v.to(MOMENT), mask=lane)


@dataclass(frozen=True)
class StepValues:
    """This step's values, each a 0-dim device tensor, in the order of the kernel's ``*_ptr`` arguments."""

    keep: Tensor  # 1.0, or 0.0 for a skipped step
    decay: Tensor  # 1 − lr·wd·keep, the decoupled weight-decay factor
    reset: Tensor  # 1.0 when the moments are zeroed before this step's update
    threshold: Tensor  # θ in force (0.0: no clipping this step)
    unscale: Tensor  # 1 / loss scale of torch.amp.GradScaler (1.0 without one)

    def as_float32(self) -> list[Tensor]:
        return [getattr(self, spec.name).float().reshape(()) for spec in fields(self)]


_address_tables: OrderedDict[tuple, Tensor] = OrderedDict()
_chunk_tables: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor]] = OrderedDict()


def _cached(cache: OrderedDict, key: tuple, build):  # a small LRU
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = build()
    if len(cache) > _TABLE_CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":
        return host
    # A pinned source makes the copy asynchronous: the step never waits for the device.
    return host.pin_memory().to(device, non_blocking=True)


def _address_table(pointers: tuple[tuple[int, ...], ...], device: torch.device) -> Tensor:
    """``[5, T]`` int64 addresses of params, grads, moments and masks. Gradients are often reallocated each
    step, so this small table is rebuilt when an address changes; one host-to-device copy."""
    return _cached(_address_tables, (device, pointers),
                   lambda: _to_device(torch.tensor(pointers, dtype=torch.int64), device))


def _chunk_table(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Program → (tensor, first element), and elements per tensor: depends on the shapes only."""

    def build() -> tuple[Tensor, Tensor, Tensor]:
        chunks = torch.tensor([-(-n // CHUNK) for n in numels], dtype=torch.int64)
        chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), chunks)
        first_chunk = torch.cumsum(chunks, 0) - chunks
        chunk_start = (torch.arange(len(chunk_tensor), dtype=torch.int64) - first_chunk[chunk_tensor.long()]) * CHUNK
        return (_to_device(chunk_tensor, device), _to_device(chunk_start, device),
                _to_device(torch.tensor(numels, dtype=torch.int64), device))

    return _cached(_chunk_tables, (device, numels), build)


def fused_spam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step_sizes: list[Tensor],
    values: StepValues,
    mask_bits: list[Tensor | None],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    density: float,
    skip: bool,
    maximize: bool,
    clip_unseen: bool = False,
    clip_counts: list[Tensor | None] | None = None,
    num_warps: int | None = None,
) -> None:
    """One launch per (param dtype, grad dtype, moment dtype, sparse) bucket of real tensors on one device.

    ``step_sizes[i]`` (0-dim float32) and ``values`` are device tensors; ``mask_bits[i]`` is the packed mask of
    a sparse parameter (its moments then compact), or ``None``. Non-contiguous tensors are staged through
    contiguous copies. When ``clip_counts`` is a list, entry ``i`` becomes a 0-dim int32 count of parameter
    ``i``'s clipped coordinates. ``num_warps``: warps per program (default :data:`NUM_WARPS`).
    """
    if triton is None:
        raise RuntimeError("the fused SPAM step needs Triton: pip install triton")
    buckets: dict[tuple, list[int]] = {}
    for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs)):
        if p.numel() == 0:
            continue
        buckets.setdefault((p.dtype, g.dtype, m.dtype, mask_bits[i] is not None), []).append(i)
    device = values.keep.device
    scalars = values.as_float32()
    for (p_dtype, g_dtype, m_dtype, sparse), index in buckets.items():
        staged: list[tuple[Tensor, Tensor]] = []

        def contiguous(t: Tensor) -> Tensor:
            if t.is_contiguous():
                return t
            copy = t.contiguous()
            staged.append((t, copy))
            return copy

        ps = [contiguous(params[i]) for i in index]
        gs = [grads[i].contiguous() for i in index]
        ms = [contiguous(exp_avgs[i]) for i in index]
        vs = [contiguous(exp_avg_sqs[i]) for i in index]
        bits = [mask_bits[i] if sparse else ms[k] for k, i in enumerate(index)]  # unread when dense
        pointers = tuple(tuple(t.data_ptr() for t in column) for column in (ps, gs, ms, vs, bits))
        aligned = all(address % VECTOR_BYTES == 0 for column in pointers[:4] for address in column) and all(
            p.numel() % VECTOR_ELEMENTS == 0 for p in ps)
        addresses = _address_table(pointers, device)
        chunk_tensor, chunk_start, numels = _chunk_table(tuple(p.numel() for p in ps), device)
        counts = torch.zeros(len(index), dtype=torch.int32, device=device) if clip_counts is not None else numels
        sizes = torch.stack([step_sizes[i] for i in index])
        _spam_kernel[(len(chunk_tensor),)](
            *addresses.unbind(0), chunk_tensor, chunk_start, numels, sizes, *scalars, counts,
            beta1, beta2, eps, kept_per_stratum(density),
            PARAM=_TL_DTYPES[p_dtype], GRAD=_TL_DTYPES[g_dtype], MOMENT=_TL_DTYPES[m_dtype],
            SPARSE=sparse, SKIP=skip, MAXIMIZE=maximize, COUNT_CLIPS=clip_counts is not None, CLIP_UNSEEN=clip_unseen,
            ALIGNED=aligned, BLOCK=CHUNK, num_warps=num_warps or NUM_WARPS, **COMPILE_OPTIONS,
        )
        for original, copy in staged:
            original.copy_(copy)
        if clip_counts is not None:
            for k, i in enumerate(index):
                clip_counts[i] = counts[k]
