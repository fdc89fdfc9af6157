"""``spamopt finetune``: every option is a field of FinetuneCompareConfig or FinetuneConfig."""

from __future__ import annotations

import argparse

from ..harness.command import Command
from ..harness.config import add_options, from_args
from ..harness.processes import run_command
from .compare import FinetuneCompareConfig, compare
from .train import FinetuneConfig

_PER_RUN = ("optimizer", "optimizer_args", "seed", "run_dir", "resume")


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FinetuneCompareConfig)
    add_options(parser, FinetuneConfig, skip=_PER_RUN)


def _run(args: argparse.Namespace) -> None:
    run_command(lambda: str(compare(from_args(FinetuneCompareConfig, args), from_args(FinetuneConfig, args))))


COMMANDS = [Command(("finetune",), "supervised fine-tuning with the response-only loss: optimizers × seeds, "
                    "multiple-choice accuracy and a report", _arguments, _run)]
