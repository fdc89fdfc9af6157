"""A small real-text corpus in C4's shard format (standard-library modules as documents) and a shared token
cache, so the BPE is trained once per test session."""

from __future__ import annotations

import json
import sys
import sysconfig
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from spamopt.experiments.lm.train import TrainConfig

MODULES = ["argparse", "dataclasses", "json/decoder", "pathlib", "textwrap", "string", "shutil", "typing",
           "functools", "contextlib", "tempfile", "csv"]


def stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / f"{m}.py").read_text() for m in MODULES]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """train-0000{0,1}-of-00002.jsonl and validation-00000-of-00001.jsonl, documents from the stdlib."""
    out = tmp_path_factory.mktemp("corpus")
    docs = stdlib_documents()
    shards = {"train-00000-of-00002.jsonl": docs[:5], "train-00001-of-00002.jsonl": docs[5:10],
              "validation-00000-of-00001.jsonl": docs[10:]}
    for name, texts in shards.items():
        (out / name).write_text("".join(json.dumps({"text": t, "url": "fixture"}) + "\n" for t in texts))
    return out


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture()
def small_run(corpus_dir, token_cache, tmp_path) -> TrainConfig:
    """A few-second training run of the tiny model over the fixture corpus."""
    return TrainConfig(model="tiny", data=str(corpus_dir), vocab_size=512, cache_dir=str(token_cache), seq_len=32,
                       batch_size=8, steps=8, warmup_steps=2, lr=3e-3, eval_every=4, eval_tokens=1024,
                       log_every=1, checkpoint_every=3, run_dir=str(tmp_path / "run"), progress=False)


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
