"""``spamopt rl``: every option is a field of RLCompareConfig or RLConfig."""

from __future__ import annotations

from ..harness.command import grid_command
from .compare import RLCompareConfig, compare
from .train import RLConfig

COMMANDS = [grid_command("rl", "PPO on MuJoCo tasks (stable-baselines3, gymnasium): tasks × optimizers × seeds, "
                         "and a report", RLCompareConfig, RLConfig, compare,
                         per_run=("env", "optimizer", "optimizer_args", "seed", "run_dir", "resume"))]
