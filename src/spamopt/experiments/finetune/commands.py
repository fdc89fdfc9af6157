"""``spamopt finetune``: every option is a field of FinetuneCompareConfig or FinetuneConfig."""

from __future__ import annotations

from ..harness.command import grid_command
from .compare import FinetuneCompareConfig, compare
from .train import FinetuneConfig

COMMANDS = [grid_command("finetune", "supervised fine-tuning with the response-only loss: optimizers × seeds, "
                         "multiple-choice accuracy and a report", FinetuneCompareConfig, FinetuneConfig, compare,
                         per_run=("optimizer", "optimizer_args", "seed", "run_dir", "resume"))]
