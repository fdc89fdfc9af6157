"""``spamopt rl``: every option is a field of RLCompareConfig or RLConfig."""

from __future__ import annotations

from ..harness.command import grid_command
from .compare import RLCompareConfig, compare
from .train import RLConfig

COMMANDS = [grid_command("rl", "PPO on MuJoCo tasks (stable-baselines3, gymnasium): tasks × optimizers × seeds, "
                         "and a report", RLCompareConfig, RLConfig, compare,
                         per_run=("env", "optimizer", "optimizer_args", "seed", "run_dir", "resume"),
                         writes="OUT_DIR/<task>/<optimizer>/seed<k>/ per run (config.json, metrics.jsonl, "
                                "checkpoint.pt, summary.json), and OUT_DIR/report.md, results.json and a PNG per task",
                         example="spamopt rl --envs HalfCheetah-v5 --seeds 0 --timesteps 4096 --eval-interval 2048 "
                                 "--out-dir runs/try-rl")]
