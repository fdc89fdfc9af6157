"""Optimizers × seeds on one base config: each run in ``out_dir/<optimizer>/seed<k>``, resumed when interrupted
and reused when finished, so a grid continues where it stopped."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .processes import is_rank_zero

__all__ = ["parse_list", "run_dir", "finished", "run_grid"]

CONFIG = "config.json"
SUMMARY = "summary.json"


def parse_list(name: str, text: str, convert: Callable[[str], Any] = str) -> list[Any]:
    """``"a,b"`` → ``[convert("a"), convert("b")]``; an empty list raises ``ValueError`` naming ``name``."""
    items = [convert(item.strip()) for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"Invalid {name} value: {text!r} (a non-empty comma-separated list)")
    return items


def run_dir(out_dir: str | Path, name: str, seed: int) -> Path:
    return Path(out_dir) / name / f"seed{seed}"


def finished(directory: str | Path, config: Any) -> bool:
    """A run is finished when it wrote its summary under exactly this config (a dataclass)."""
    directory = Path(directory)
    if not (directory / SUMMARY).exists() or not (directory / CONFIG).exists():
        return False
    return json.loads((directory / CONFIG).read_text()) == json.loads(json.dumps(asdict(config)))


def run_grid(out_dir: str | Path, names: list[str], seeds: list[int], make_run: Callable[[str, int, Path], Any],
             execute: Callable[[Any], Any]) -> None:
    """For every (name, seed): ``make_run(name, seed, run_dir)`` gives the run's config (a dataclass written to
    ``config.json`` by ``execute``); runs already finished under that config are skipped, the others executed
    (which resumes them from their checkpoints)."""
    for name in names:
        for seed in seeds:
            directory = run_dir(out_dir, name, seed)
            config = make_run(name, seed, directory)
            if finished(directory, config):
                continue
            if is_rank_zero():
                print(f"== {name}, seed {seed} -> {directory}", flush=True)
            execute(config)
