"""Helpers of the LM harness's tests: a small real-text corpus in C4's shard format (standard-library modules as
documents), the ``spamopt train`` command line of a config, and a checkpoint's weights."""

from __future__ import annotations

import json
import sys
import sysconfig
from dataclasses import asdict
from pathlib import Path

import torch

from spamopt.experiments.lm.train import TrainConfig

MODULES = ["argparse", "dataclasses", "json/decoder", "pathlib", "textwrap", "string", "shutil", "typing",
           "functools", "contextlib", "tempfile", "csv"]


def stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / f"{m}.py").read_text() for m in MODULES]


def write_corpus(out: Path) -> Path:
    """train-0000{0,1}-of-00002.jsonl and validation-00000-of-00001.jsonl in ``out``, stdlib documents."""
    docs = stdlib_documents()
    shards = {"train-00000-of-00002.jsonl": docs[:5], "train-00001-of-00002.jsonl": docs[5:10],
              "validation-00000-of-00001.jsonl": docs[10:]}
    for name, texts in shards.items():
        (out / name).write_text("".join(json.dumps({"text": t, "url": "fixture"}) + "\n" for t in texts))
    return out


def train_command(config: TrainConfig) -> list[str]:
    """``python -m spamopt.cli train`` with every field of ``config`` as a command-line option."""
    args = [sys.executable, "-m", "spamopt.cli", "train"]
    for key, value in asdict(config).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def checkpoint_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in a run's last checkpoint."""
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["model"]
