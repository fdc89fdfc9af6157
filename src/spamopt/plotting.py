"""Figures written to files: matplotlib without a display, imported on use (the ``report`` extra)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from .extras import require

__all__ = ["pyplot", "save"]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend; an ImportError names the extra when it is missing."""
    matplotlib = require("matplotlib", "report")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> Path:
    """Lay out, write at 120 dpi and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
