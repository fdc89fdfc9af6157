"""Text for the experiments. The embedded default is the source of the running Python's standard library."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def stdlib_bytes(max_bytes: int = 4 << 20) -> torch.Tensor:
    """Up to ``max_bytes`` of standard-library ``.py`` source, files in sorted order, as a uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


def random_windows(data: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``length + 1`` consecutive tokens at random offsets (inputs and targets)."""
    starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()]).long()
