"""``metrics.jsonl``: one JSON object per record, mirrored to TensorBoard and Weights & Biases when asked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spamopt.extras import require
from spamopt.jsonl import read_jsonl

__all__ = ["Metrics", "read_records"]

METRICS = "metrics.jsonl"


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (a last line cut short by a kill is dropped, with a warning)."""
    return read_jsonl(Path(run_dir) / METRICS)


class Metrics:
    """Appends ``{"step": s, **values}`` records to ``run_dir/metrics.jsonl``.

    On resume (``resumed_step`` > 0) records after that step are dropped: the resumed run writes them again,
    so the file equals an uninterrupted run's. ``tensorboard`` writes scalars to ``run_dir/tensorboard``;
    ``wandb`` logs to Weights & Biases, offline unless ``WANDB_MODE`` says otherwise. A disabled instance
    (``enabled=False``, every rank but 0) writes nothing.
    """

    def __init__(self, run_dir: Path, *, config: dict[str, Any], resumed_step: int = 0, enabled: bool = True,
                 tensorboard: bool = False, wandb: bool = False) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS
        self.writers: list[Any] = []
        self.wandb_run: Any = None
        if not enabled:
            return
        kept = []
        if resumed_step and self.path.exists():
            kept = [record for record in read_jsonl(self.path) if record["step"] <= resumed_step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        if tensorboard:
            self.writers.append(require("torch.utils.tensorboard", "tensorboard", "tensorboard")
                                .SummaryWriter(str(run_dir / "tensorboard")))
        if wandb:
            self.wandb_run = require("wandb", "wandb").init(
                project="spamopt", dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE", "offline"),
                name=run_dir.name)

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        for writer in self.writers:
            for key, value in values.items():
                writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
