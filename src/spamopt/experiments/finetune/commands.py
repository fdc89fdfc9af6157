"""``spamopt finetune``: every option is a field of FinetuneCompareConfig or FinetuneConfig."""

from __future__ import annotations

from ..harness.command import grid_command
from .compare import FinetuneCompareConfig, compare
from .train import FinetuneConfig

COMMANDS = [grid_command("finetune", "supervised fine-tuning with the response-only loss: optimizers × seeds, "
                         "multiple-choice accuracy and a report", FinetuneCompareConfig, FinetuneConfig, compare,
                         per_run=("optimizer", "optimizer_args", "seed", "run_dir", "resume"),
                         writes="OUT_DIR/<optimizer>/seed<k>/ per run (config.json, metrics.jsonl, checkpoint.pt, "
                                "summary.json), and OUT_DIR/report.md, results.json and curves.png",
                         example="spamopt finetune --optimizers spam,adamw --seeds 0 --pretrain-steps 20 --steps 10 "
                                 "--out-dir runs/try-finetune")]
