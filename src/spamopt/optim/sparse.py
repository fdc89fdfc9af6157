"""The sparse-momentum index: which coordinates of a matrix keep Adam moments during one reset period.

Storage: a bitmask, one bit per coordinate (``uint8``, ``⌈n/8⌉`` bytes), so a density-``d`` fp32 matrix
costs ``8·d + 0.125`` bytes of optimizer state per element instead of the reference's ``8·d + 1`` (boolean
mask) — and no index arrays. The moments themselves are compact 1-D buffers holding the kept coordinates in
row-major (logical) order.

Drawing: the coordinates are split into strata of ``STRATUM = 4096`` consecutive elements and exactly
``round(d · len)`` positions are chosen uniformly without replacement inside each stratum. Every coordinate
is therefore kept with probability ≈ ``d``, and the kept count depends only on ``(n, d)``: it is the same in
every period, so moment buffers never change shape and a checkpoint's shapes always match (which
``torch.distributed.checkpoint`` requires). The draw is a pure function of ``(seed, generation, device
type)``: it regenerates identically after a resume, and only a 0-dim seed is stored beside the bits.

Transient cost of a step: one boolean mask of ``n`` bytes (a quarter of an fp32 param) plus compact buffers
of the kept size; nothing of full size in fp32 and no index tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # finds kept positions on the CPU faster than torch does (kept_index); not a requirement
    import numpy as _numpy
except ImportError:  # pragma: no cover - every extra installs numpy
    _numpy = None

__all__ = ["STRATUM", "kept_count", "kept_per_stratum", "param_seed", "draw_mask", "unpack_mask", "kept_index",
           "slice_bits", "count_kept", "gather", "scatter_"]

STRATUM = 4096
_ROWS_PER_DRAW = 256  # strata drawn together: bounds the drawing temporaries to ~12 MiB
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: decorrelates nearby seeds (parameter ordinals, generations)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def param_seed(base_seed: int, ordinal: int) -> int:
    """A per-parameter seed from the process seed (``torch.initial_seed()``) and the parameter's position."""
    return _mix64(_mix64(base_seed) ^ ordinal) >> 1  # 63 bits: fits an int64 tensor


def _stratum_kept(length: int, density: float) -> int:
    return int(round(density * length))


def kept_per_stratum(density: float) -> int:
    """Kept coordinates in each full stratum of ``STRATUM`` elements (the fused kernel's compact indexing)."""
    return _stratum_kept(STRATUM, density)


def kept_count(numel: int, density: float) -> int:
    """Number of coordinates with moments for a matrix of ``numel`` elements at ``density``."""
    full, rest = divmod(numel, STRATUM)
    return full * kept_per_stratum(density) + _stratum_kept(rest, density)


def _draw_rows(rows: int, length: int, kept: int, generator: torch.Generator, device: torch.device) -> Tensor:
    mask = torch.zeros(rows, length, dtype=torch.bool, device=device)
    if kept > 0:
        keys = torch.rand(rows, length, generator=generator, device=device)
        mask.scatter_(1, keys.topk(kept, dim=1, sorted=False).indices, True)
    return mask


def _pack(mask: Tensor) -> Tensor:
    """Pack a flat boolean tensor (length a multiple of 8) into bytes, bit ``i % 8`` of byte ``i // 8``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (mask.view(-1, 8).to(torch.uint8) << shifts).sum(dim=1, dtype=torch.uint8)


def draw_mask(numel: int, density: float, seed: int, generation: int, device: torch.device | str) -> Tensor:
    """Draw the bitmask of period ``generation`` (``uint8``, ``⌈numel/8⌉`` bytes) on ``device``."""
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(_mix64(seed ^ _mix64(generation)) >> 1)
    full, rest = divmod(numel, STRATUM)
    bits = torch.empty((numel + 7) // 8, dtype=torch.uint8, device=device)
    per_row = STRATUM // 8
    for row in range(0, full, _ROWS_PER_DRAW):
        rows = min(_ROWS_PER_DRAW, full - row)
        chunk = _draw_rows(rows, STRATUM, kept_per_stratum(density), generator, device)
        bits[row * per_row : (row + rows) * per_row] = _pack(chunk.view(-1))
    if rest:
        tail = torch.zeros((rest + 7) // 8 * 8, dtype=torch.bool, device=device)
        tail[:rest] = _draw_rows(1, rest, _stratum_kept(rest, density), generator, device).view(-1)
        bits[full * per_row :] = _pack(tail)
    return bits


def unpack_mask(bits: Tensor, numel: int) -> Tensor:
    """The boolean mask (flat, ``numel`` long) of a packed bitmask; one byte per coordinate, transient."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = (bits.unsqueeze(1) >> shifts).bitwise_and_(1)
    return unpacked.view(-1)[:numel].view(torch.bool)


def _unpack_range(bits: Tensor, start: int, end: int) -> Tensor:
    """The boolean mask of coordinates ``[start, end)`` only (transient: ``end − start`` bytes)."""
    first, last = start // 8, (end + 7) // 8
    return unpack_mask(bits[first:last], (last - first) * 8)[start - 8 * first : end - 8 * first]


def slice_bits(bits: Tensor, start: int, end: int) -> Tensor:
    """The packed bitmask of coordinates ``[start, end)`` of a matrix, renumbered from 0: a rank's part of the
    full mask when the matrix is sharded (an FSDP2 shard is such a range of the row-major order)."""
    mask = _unpack_range(bits, start, end)
    padded = torch.zeros((end - start + 7) // 8 * 8, dtype=torch.bool, device=bits.device)
    padded[: end - start] = mask
    return _pack(padded)


def count_kept(bits: Tensor, start: int, end: int) -> int:
    """How many of the coordinates ``[start, end)`` the bitmask keeps (reads the count on the host)."""
    return int(_unpack_range(bits, start, end).sum()) if end > start else 0


def kept_index(bits: Tensor, numel: int) -> Tensor:
    """The flat row-major positions of the coordinates a packed bitmask keeps (int64, ascending; transient, 8
    bytes per kept coordinate). Finding them is the costly part of moving between a matrix and its compact
    buffers, so a step finds them once per tensor and every :func:`gather` and :func:`scatter_` of that tensor
    is a plain indexed copy (three boolean-mask copies found them three times: 2-3x slower on the CPU).

    On the CPU, with numpy installed, numpy unpacks the bits and lists the set ones: the same positions, found
    fast enough that a compiled sparse step at LLaMA-60M shapes is 1.3x faster than with torch's ``nonzero``
    (``benchmarks/sparse_copies.py``); elsewhere torch's."""
    if _numpy is not None and bits.device.type == "cpu":
        mask = _numpy.unpackbits(bits.numpy(), count=numel, bitorder="little").view(_numpy.bool_)
        return torch.from_numpy(_numpy.flatnonzero(mask).astype(_numpy.int64, copy=False))
    return unpack_mask(bits, numel).nonzero().squeeze(1)


def gather(tensor: Tensor, index: Tensor) -> Tensor:
    """Copy of the kept coordinates (``index`` from :func:`kept_index`) of ``tensor``, any strides, in
    row-major order."""
    return tensor.view(-1).index_select(0, index) if tensor.is_contiguous() else tensor.take(index)


def scatter_(tensor: Tensor, index: Tensor, values: Tensor) -> None:
    """Write ``values`` (the output of :func:`gather`) back into the kept coordinates of ``tensor``. An indexed
    copy along a flat view (``put_`` would serve any strides, but torch's deterministic mode refuses it)."""
    if tensor.is_contiguous():
        tensor.view(-1).index_copy_(0, index, values)
    else:
        flat = tensor.reshape(-1)  # a copy
        flat.index_copy_(0, index, values)
        tensor.copy_(flat.view(tensor.shape))
