"""``spamopt ts``: every option is a field of TSCompareConfig or TSConfig."""

from __future__ import annotations

from ..harness.command import grid_command
from .compare import TSCompareConfig, compare
from .train import TSConfig

COMMANDS = [grid_command("ts", "PatchTST forecasting with injected anomalies: severities × optimizers × seeds, "
                         "and a report", TSCompareConfig, TSConfig, compare,
                         per_run=("optimizer", "optimizer_args", "severity", "seed", "run_dir", "resume"))]
