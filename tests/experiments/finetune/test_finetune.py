"""``spamopt finetune`` end to end on a tiny harness base: each optimizer fine-tunes with the response-only
loss (the loss falls), an interrupted run resumes to the uninterrupted run's weights, the report and its PNG
are written and finished runs reused, the held-out items never occur in training, and a transformers
directory loads as a base."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

pytest.importorskip("tokenizers")

from spamopt.experiments.finetune import train as ft_train  # noqa: E402
from spamopt.experiments.finetune.compare import FinetuneCompareConfig, compare  # noqa: E402
from spamopt.experiments.finetune.model import load_causal_lm  # noqa: E402
from spamopt.experiments.finetune.train import FinetuneConfig, load_items, train  # noqa: E402
from spamopt.experiments.harness.metrics import read_records  # noqa: E402
from spamopt.experiments.lm.train import TrainConfig  # noqa: E402
from spamopt.experiments.lm.train import train as pretrain  # noqa: E402

from ..lm.helpers import write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """The tiny LLaMA pre-trained for 10 steps on a few stdlib modules."""
    root = tmp_path_factory.mktemp("base")
    (root / "corpus").mkdir()
    config = TrainConfig(model="tiny", data=str(write_corpus(root / "corpus")), vocab_size=512,
                         cache_dir=str(root / "cache"), seq_len=32, batch_size=8, steps=10, warmup_steps=2,
                         eval_every=0, eval_tokens=1024,
                         run_dir=str(root / "run"), progress=False)
    pretrain(config)
    return config.run_dir


@pytest.fixture()
def short(base, tmp_path) -> FinetuneConfig:
    return FinetuneConfig(base=base, train_items=200, eval_items=20, steps=12, warmup_steps=2, batch_size=8,
                          max_length=96, eval_every=6, lr=3e-3, run_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("optimizer", ["adamw", "adam-clip", "spam", "stable-spam"])
def test_each_optimizer_fine_tunes(short, optimizer):
    summary = train(replace(short, optimizer=optimizer, optimizer_args={"reset_interval": 5} if "spam" in
                            optimizer else {}))
    records = read_records(short.run_dir)
    assert [r["step"] for r in records] == [0, 6, 12]
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["steps"] == 12


def test_interrupted_run_resumes_to_the_same_weights(short, tmp_path, monkeypatch):
    whole = replace(short, run_dir=str(tmp_path / "whole"))
    train(whole)
    real, calls = ft_train.evaluate, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # base, step 6 (checkpointed), step 12: killed before its checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ft_train, "evaluate", failing)
    resumed = replace(short, run_dir=str(tmp_path / "resumed"), resume=True)
    with pytest.raises(KeyboardInterrupt):
        train(resumed)
    monkeypatch.setattr(ft_train, "evaluate", real)
    train(resumed)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert read_records(whole.run_dir) == read_records(resumed.run_dir)


def test_held_out_items_are_not_trained_on(short):
    train_items, held_out = load_items(short)
    assert not {e.instruction for e in held_out} & {e.instruction for e in train_items}
    assert len(held_out) == 20


def test_compare_writes_report_and_reuses_runs(short, tmp_path):
    config = FinetuneCompareConfig(optimizers="adamw,spam", seeds="0,1", out_dir=str(tmp_path / "cmp"))
    report = compare(config, short)
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert set(results["rows"]) == {"adamw", "spam"} and len(results["rows"]["spam"]["accuracy"]) == 2
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 10_000
    assert "| spam |" in report.read_text()
    stamp = (tmp_path / "cmp" / "spam" / "seed0" / "summary.json").stat().st_mtime_ns
    compare(config, short)
    assert (tmp_path / "cmp" / "spam" / "seed0" / "summary.json").stat().st_mtime_ns == stamp


def test_a_transformers_directory_is_a_base(tmp_path):
    """A LlamaForCausalLM and a tokenizer saved locally load as a base: logits over its vocabulary."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<unk>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    fast.save_pretrained(tmp_path / "hf")
    loaded = load_causal_lm(str(tmp_path / "hf"))
    ids = loaded.encode("the correct answer is option2")
    assert len(ids) == len("the correct answer is option2") and loaded.eos == vocab["</s>"]
    assert loaded.model(torch.tensor([ids])).shape == (1, len(ids), len(vocab))
    assert loaded.layout.is_block_matrix("core.model.layers.0.self_attn.q_proj.weight", (32, 32))


def test_a_bad_base_is_named(tmp_path):
    with pytest.raises(ValueError, match="Invalid base value"):
        load_causal_lm(str(tmp_path))
