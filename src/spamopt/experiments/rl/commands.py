"""``spamopt rl``: every option is a field of RLCompareConfig or RLConfig."""

from __future__ import annotations

import argparse

from ..harness.command import Command
from ..harness.config import add_options, from_args
from ..harness.processes import run_command
from .compare import RLCompareConfig, compare
from .train import RLConfig

_PER_RUN = ("env", "optimizer", "optimizer_args", "seed", "run_dir", "resume")


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, RLCompareConfig)
    add_options(parser, RLConfig, skip=_PER_RUN)


def _run(args: argparse.Namespace) -> None:
    run_command(lambda: str(compare(from_args(RLCompareConfig, args), from_args(RLConfig, args))))


COMMANDS = [Command(("rl",), "PPO on MuJoCo tasks (stable-baselines3, gymnasium): tasks × optimizers × seeds, "
                    "and a report", _arguments, _run)]
