"""Probes below the dispatcher that see, on any device, what a step costs beyond its arithmetic.

HostReads — operations that make the host wait for the device. On a GPU such an operation is a host
synchronisation, which CUDA's sync debug mode catches, but only on a GPU. Below the dispatcher the same
operations are visible on the CPU too: reading a tensor's value into Python (``.item()``, ``int()``,
``bool()``, ``if tensor:``), comparisons returning a Python bool, and operations whose output *size* depends
on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``). Device-to-host copies are
not visible here (every tensor is on the CPU); the CUDA test covers those.

Allocations — the size of every tensor an operation creates (an output not sharing storage with an input).
A Triton kernel allocates nothing itself, so this bounds a fused step's peak memory beyond its inputs.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
VALUE_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
DATA_DEPENDENT_SHAPES = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                         aten.unique_dim.default, aten.unique_consecutive.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostReads(TorchDispatchMode):
    """Records every host-waiting operation run inside the ``with`` block as ``(operator, shape)``, except value
    reads of the tensors in ``allowed`` (state kept on the host by design, such as SPAM's step clock)."""

    def __init__(self, allowed: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.allowed = {t.data_ptr() for t in allowed}
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        boolean_index = func in INDEXING and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        allowed = func in VALUE_READS and isinstance(first, torch.Tensor) and first.data_ptr() in self.allowed
        if not allowed and (func in VALUE_READS or func in DATA_DEPENDENT_SHAPES or boolean_index):
            self.seen.append((str(func), tuple(first.shape) if isinstance(first, torch.Tensor) else ()))
        return func(*args, **(kwargs or {}))


class Allocations(TorchDispatchMode):
    """Records the storage size in bytes of every new tensor created inside the ``with`` block, with its
    operator, in ``created``."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.created.append((t.untyped_storage().nbytes(), str(func)))
        return out
