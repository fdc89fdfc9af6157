"""``spamopt ts``: every option is a field of TSCompareConfig or TSConfig."""

from __future__ import annotations

import argparse

from ..harness.command import Command
from ..harness.config import add_options, from_args
from ..harness.processes import run_command
from .compare import TSCompareConfig, compare
from .train import TSConfig

_PER_RUN = ("optimizer", "optimizer_args", "severity", "seed", "run_dir", "resume")


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TSCompareConfig)
    add_options(parser, TSConfig, skip=_PER_RUN)


def _run(args: argparse.Namespace) -> None:
    run_command(lambda: str(compare(from_args(TSCompareConfig, args), from_args(TSConfig, args))))


COMMANDS = [Command(("ts",), "PatchTST forecasting with injected anomalies: severities × optimizers × seeds, "
                    "and a report", _arguments, _run)]
