"""``spamopt train`` and ``spamopt compare``: every option is a field of TrainConfig / CompareConfig."""

from __future__ import annotations

import argparse
import json

from ..harness.command import Command
from ..harness.config import add_options, from_args
from ..harness.processes import run_command
from .compare import CompareConfig, compare
from .train import TrainConfig, train

# compare sets these per run
_PER_RUN = ("optimizer", "seed", "run_dir", "resume", "optimizer_args")  # --overwrite applies to every run


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CompareConfig)
    add_options(parser, TrainConfig, skip=_PER_RUN)


def _train(args: argparse.Namespace) -> None:
    def work() -> str:
        summary = train(from_args(TrainConfig, args))
        if summary.get("stopped"):  # diverged: the summary says where; the command fails
            raise RuntimeError(summary["stopped"])
        return json.dumps(summary, indent=2)

    run_command(work)


def _compare(args: argparse.Namespace) -> None:
    run_command(lambda: str(compare(from_args(CompareConfig, args),
                                    from_args(TrainConfig, args, run_dir=str(args.out_dir)))))


COMMANDS = [
    Command(("train",), "pre-train a LLaMA with one optimizer (torchrun for several GPUs)",
            lambda parser: add_options(parser, TrainConfig), _train,
            writes="RUN_DIR/config.json, metrics.jsonl, checkpoint.pt (and checkpoint.prev.pt), summary.json; "
                   "with --spikes or --forensics, RUN_DIR/spikes/spikes.jsonl",
            example="spamopt train --model tiny --steps 20 --eval-every 10 --run-dir runs/try"),
    Command(("compare",), "several optimizers × seeds on one config, and a report", _compare_arguments, _compare,
            writes="a run folder per optimizer and seed, OUT_DIR/<optimizer>/seed<k>/ (as train writes), and "
                   "OUT_DIR/report.md, results.json, curves.png and memory.png",
            example="spamopt compare --optimizers spam,adamw --seeds 0 --model tiny --steps 20 "
                    "--out-dir runs/try-compare"),
]
