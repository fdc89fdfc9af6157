"""Sparse momentum on FSDP2 shards: which part of a matrix a rank holds, and the saved form of its moments.

FSDP2 splits a matrix by rows (``Shard(0)``), so each rank holds one contiguous range ``[start, end)`` of the
matrix's row-major order. The sparse mask is drawn for the whole matrix, identically on every rank (it is a
function of the full matrix's coordinates, the parameter's seed and the period), so one process and any number
of processes keep the same coordinates. Each rank stores:

* the whole packed mask (``⌈n/8⌉`` bytes, the same on every rank: 1/32 of an fp32 matrix), and
* the compact moments of the kept coordinates inside its own range, in row-major order.

The kept coordinates of the ranks' ranges, concatenated in row order, are exactly the one-process compact
buffer. That concatenation is the *saved form*: :meth:`SPAM.state_dict` gathers it (a collective, as
``torch.distributed.checkpoint.state_dict.get_state_dict`` already is under FSDP2) and ``load_state_dict`` cuts
each rank's part out of it, so a checkpoint does not depend on the number of processes that wrote it.

A shard boundary may cut a 4096-element sampling stratum; the draw is unchanged (it never looks at shards), but
then how many kept coordinates fall on each side varies from period to period, so a rank's compact buffers
are reallocated at each mask redraw instead of being zeroed in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .base import is_distributed_tensor

__all__ = ["RowShard", "row_shard", "broadcast_seed", "gather_compact"]


@dataclass(frozen=True)
class RowShard:
    """A rank's part of a matrix split by rows: ``[start, end)`` in the full matrix's row-major (real) order,
    and the process group over which the rows are split."""

    start: int
    end: int
    group: dist.ProcessGroup


def row_shard(param: Tensor) -> RowShard | None:
    """The :class:`RowShard` of a DTensor split by rows, or None for a tensor each process holds whole.

    Raises ``NotImplementedError`` for other layouts (split along another dimension, or along rows over more
    than one mesh dimension), where a rank's part is not one range of the row-major order.
    """
    if not is_distributed_tensor(param):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded = [dim for dim, placement in enumerate(param.placements) if not isinstance(placement, Replicate)]
    if not sharded:
        return None
    placement = param.placements[sharded[0]]
    if len(sharded) > 1 or type(placement) is not Shard or placement.dim != 0:
        raise NotImplementedError(f"SPAM's sparse momentum (density < 1) needs matrices split by rows over one "
                                  f"mesh dimension (FSDP2's Shard(0)); this one is placed as {param.placements}")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    row = math.prod(param.shape[1:]) * (2 if param.is_complex() else 1)
    return RowShard(offset[0] * row, (offset[0] + shape[0]) * row, param.device_mesh.get_group(sharded[0]))


def broadcast_seed(seed: int, shard: RowShard, device: torch.device) -> int:
    """The first rank's mask seed, so that every rank draws the same mask even if the processes were seeded
    differently."""
    value = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(value, src=dist.get_global_rank(shard.group, 0), group=shard.group)
    return int(value)


def gather_compact(local: Tensor, offset: int, shard: RowShard) -> Tensor:
    """The full compact buffer from every rank's part; ``offset`` is where this rank's part starts in it (the
    kept coordinates before ``shard.start``). Every rank of the group must call this."""
    place = torch.tensor([offset, local.numel()], dtype=torch.int64, device=local.device)
    places = [torch.empty_like(place) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(places, place, group=shard.group)
    spans = [tuple(p.tolist()) for p in places]
    longest = max(count for _, count in spans)
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in spans]
    dist.all_gather(parts, padded, group=shard.group)
    full = torch.empty(sum(count for _, count in spans), dtype=local.dtype, device=local.device)
    for (start, count), part in zip(spans, parts):
        full[start : start + count] = part[:count]
    return full
