"""Fixtures of the LM harness's tests: the corpus, a token cache shared by the session (the BPE is trained once)
and a few-second training config. Helpers live in :mod:`.helpers`."""

from __future__ import annotations

from pathlib import Path

import pytest

from spamopt.experiments.lm.train import TrainConfig

from .helpers import write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """train-0000{0,1}-of-00002.jsonl and validation-00000-of-00001.jsonl, documents from the stdlib."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture()
def small_run(corpus_dir, token_cache, tmp_path) -> TrainConfig:
    """A few-second training run of the tiny model over the fixture corpus."""
    return TrainConfig(model="tiny", data=str(corpus_dir), vocab_size=512, cache_dir=str(token_cache), seq_len=32,
                       batch_size=8, steps=8, warmup_steps=2, lr=3e-3, eval_every=4, eval_tokens=1024,
                       log_every=1, checkpoint_every=3, run_dir=str(tmp_path / "run"), progress=False)
