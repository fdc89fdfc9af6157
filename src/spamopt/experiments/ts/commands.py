"""``spamopt ts``: every option is a field of TSCompareConfig or TSConfig."""

from __future__ import annotations

from ..harness.command import grid_command
from .compare import TSCompareConfig, compare
from .train import TSConfig

COMMANDS = [grid_command("ts", "PatchTST forecasting with injected anomalies: severities × optimizers × seeds, "
                         "and a report", TSCompareConfig, TSConfig, compare,
                         per_run=("optimizer", "optimizer_args", "severity", "seed", "run_dir", "resume"),
                         writes="OUT_DIR/S<severity>/<optimizer>/seed<k>/ per run (config.json, metrics.jsonl, "
                                "checkpoint.pt, summary.json), and OUT_DIR/report.md, results.json and curves.png",
                         example="spamopt ts --data nyc-weather --severities 0,5 --seeds 0 --epochs 1 --lookback 96 "
                                 "--out-dir runs/try-ts")]
