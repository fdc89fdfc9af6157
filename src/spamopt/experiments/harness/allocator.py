"""Keep freed memory in the process, so that large CPU tensors are not page-faulted in afresh on every step.

glibc's ``malloc`` hands every allocation of 32 MiB or more (and smaller ones, as its thresholds adapt) straight
to the operating system with ``mmap`` and gives it back on ``free``; the next allocation of that size gets new
pages, and the kernel zeroes and maps each 4 KiB page on first touch. A CPU training step allocates such
tensors by the dozen (activations, logits, their gradients, an eager optimizer's temporaries), so a large part
of its time went to page faults: ``x * 2`` on an 8M-element float32 tensor took 32 ms, 8 ms with the memory
kept (``benchmarks/allocator_speed.py`` measures whole training steps).

:func:`keep_freed_memory` raises both thresholds to 1 GiB with ``mallopt``: allocations below it come from
the process's heap, and freed memory stays there for the next one (most of the time: torch allocates with
``posix_memalign``, which in glibc 2.36 asks for slightly more than a freed chunk of the same size holds, so
a freed chunk with a small allocation right after it is passed over and fresh pages are taken: in 16
processes, 25 to 29 of 29 repeated 32 MiB temporaries came without page faults, none with glibc's defaults).
The cost is resident memory: the process keeps its peak instead of returning what it frees. Every ``spamopt``
command does this at start (and so do its parallel workers), unless ``SPAMOPT_ALLOCATOR=system`` is set;
other allocators (jemalloc, tcmalloc preloaded) and other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["KEPT_BYTES", "keep_freed_memory"]

#: Allocations below this are served from the heap, and this much freed memory may stay at its top.
KEPT_BYTES = 1 << 30

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Raise glibc's ``mmap`` and trim thresholds to :data:`KEPT_BYTES` for this process; returns whether it
    did (False: not glibc, or ``SPAMOPT_ALLOCATOR=system``)."""
    choice = os.environ.get("SPAMOPT_ALLOCATOR", "")
    if choice not in ("", "keep", "system"):
        raise ValueError(f"Invalid SPAMOPT_ALLOCATOR value: {choice!r} (one of 'keep', the default, or 'system')")
    if choice == "system" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEPT_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, KEPT_BYTES))
