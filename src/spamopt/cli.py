"""``spamopt <command>``: parses arguments, then calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per dataclass field, typed from its annotation, defaulting to the field's default."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if spec.name in skip:
            continue
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        kind = hints[spec.name]
        help_text = spec.metadata.get("help", "") + (f" (default: {default})" if default not in (None, {}) else "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=spec.metadata.get("help"))
            continue
        if typing.get_origin(kind) is dict:
            convert: Any = json.loads
        else:
            options = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
            convert = options[0]
        parser.add_argument(flag, type=convert, default=default, metavar=spec.name.upper(), help=help_text)


def _config(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **overrides)


def main(argv: list[str] | None = None) -> None:
    from spamopt.experiments.lm.compare import CompareConfig
    from spamopt.experiments.lm.train import TrainConfig

    parser = argparse.ArgumentParser(prog="spamopt", description="SPAM optimizer tools")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="pre-train a LLaMA with one optimizer (torchrun for several GPUs)")
    _add_dataclass_options(train, TrainConfig)

    compare = commands.add_parser("compare", help="several optimizers × seeds on one config, and a report")
    _add_dataclass_options(compare, CompareConfig)
    _add_dataclass_options(compare, TrainConfig, skip=("optimizer", "seed", "run_dir", "resume", "optimizer_args"))

    spikes = commands.add_parser("spikes", help="gradient-spike telemetry").add_subparsers(dest="action",
                                                                                          required=True)
    report = spikes.add_parser("report", help="plots and a markdown summary of a monitored run")
    report.add_argument("run_dir", type=Path)
    demo = spikes.add_parser("demo", help="monitor a tiny LLaMA on the stdlib source with AdamW and SPAM")
    demo.add_argument("--run-dir", type=Path, default=Path("runs/spikes-demo"))
    demo.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)

    if args.command in ("train", "compare"):
        _train_or_compare(args)
    elif args.action == "report":
        from spamopt.spikes.report import build_report

        print(build_report(args.run_dir))
    else:
        from spamopt.experiments.spikes_demo import main as demo_main

        for path in demo_main(args.run_dir, args.steps):
            print(path)


def _train_or_compare(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from spamopt.experiments.lm.compare import CompareConfig, compare
    from spamopt.experiments.lm.train import TrainConfig, train

    try:
        if args.command == "train":
            result = json.dumps(train(_config(TrainConfig, args)), indent=2)
        else:
            result = str(compare(_config(CompareConfig, args), _config(TrainConfig, args, run_dir=str(args.out_dir))))
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(result)
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
        # Gloo's worker threads can still be alive during interpreter finalisation and abort it ("terminate
        # called without an active exception", pytorch/pytorch#190489); all work is written, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
