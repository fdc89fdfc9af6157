"""``spamopt spikes demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..harness.command import Command


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/spikes-demo"))
    parser.add_argument("--steps", type=int, default=300)


def _run(args: argparse.Namespace) -> None:
    from .demo import main

    for path in main(args.run_dir, args.steps):
        print(path)


COMMANDS = [Command(("spikes", "demo"), "monitor a tiny LLaMA on the stdlib source with AdamW and SPAM",
                    _arguments, _run,
                    writes="RUN_DIR/<optimizer>/spikes.jsonl and a spike report (report.md and PNG plots) per "
                           "optimizer",
                    example="spamopt spikes demo --steps 60 --run-dir runs/try-demo")]
