"""``spamopt.groups.param_groups`` against a tied-embedding LLaMA built from a config: Linear weights are the
block matrices (sparse when density < 1), the tied embedding/head stays dense and decayed, vectors get no
decay, frozen parameters are left out, shared tensors appear once, and bad arguments are named."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from spamopt import SPAM  # noqa: E402
from spamopt.groups import param_groups  # noqa: E402


def _llama(tied: bool):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False])
def test_groups_of_a_llama(tied):
    model = _llama(tied)
    sparse, matrices, vectors = param_groups(model, weight_decay=0.1, density=0.25)
    head, embedding = model.lm_head.weight, model.model.embed_tokens.weight
    assert len(sparse["params"]) == 2 * 7 and sparse["density"] == 0.25 and sparse["weight_decay"] == 0.1
    assert all(p.dim() == 2 for p in sparse["params"])
    assert {id(p) for p in matrices["params"]} == {id(embedding), id(head)} and matrices["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in vectors["params"]) and vectors["weight_decay"] == 0.0
    listed = [id(p) for g in (sparse, matrices, vectors) for p in g["params"]]
    assert len(listed) == len(set(listed)) == len(list(model.parameters()))
    SPAM(param_groups(model, density=0.25), lr=1e-3)  # accepted as given


def test_dense_groups_and_frozen_parameters():
    model = _llama(True)
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = param_groups(model)
    assert len(groups) == 2 and "density" not in groups[0]
    assert all(p.requires_grad for g in groups for p in g["params"])


@pytest.mark.parametrize("options, match", [({"density": 0.0}, "Invalid density value"),
                                            ({"density": 1.5}, "Invalid density value"),
                                            ({"weight_decay": -1.0}, "Invalid weight_decay value")])
def test_bad_arguments_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        param_groups(_llama(True), **options)


def test_gpt2_conv1d_layers_are_block_matrices():
    """GPT-2's attention and MLP layers are transformers' Conv1D, not nn.Linear: they used to get no sparse
    momentum (density silently ignored); they are the sparse group now, and the tied wte/lm_head stays dense."""
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    sparse, matrices, _ = param_groups(model, density=0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].split(".")[-2] for p in sparse["params"]) == sorted(["c_attn", "c_proj", "c_fc",
                                                                                    "c_proj"] * 2)
    assert {names[id(p)] for p in matrices["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}


@pytest.mark.parametrize("build,heads", [
    (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
     {"bert.pooler.dense.weight", "classifier.weight"}),
    (lambda: transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=0)), {"score.weight"}),
], ids=["bert-classifier-and-pooler", "llama-score"])
def test_task_heads_stay_dense(build, heads):
    """Classification heads (and BERT's pooler) used to become sparse; they stay dense and decayed."""
    model = build()
    sparse, matrices, _ = param_groups(model, weight_decay=0.1, density=0.25)
    names = {id(p): n for n, p in model.named_parameters()}
    assert heads <= {names[id(p)] for p in matrices["params"]}
    assert heads.isdisjoint(names[id(p)] for p in sparse["params"]) and len(sparse["params"]) > 0
