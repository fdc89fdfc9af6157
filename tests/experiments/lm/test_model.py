"""The LLaMA shapes used by the benchmarks and the demo: the model builds exactly the declared parameters, and
the reference configs have the sizes the paper names (60M ... 1B; 1.34B for '1b' with an untied head)."""

from __future__ import annotations

import math

import pytest
import torch

from spamopt.experiments.lm.config import CONFIGS
from spamopt.experiments.lm.model import Llama


@pytest.mark.parametrize("name,low,high", [("60m", 57e6, 60e6), ("130m", 133e6, 136e6),
                                           ("350m", 366e6, 370e6), ("1b", 1.33e9, 1.35e9)])
def test_reference_configs_have_the_papers_sizes(name, low, high):
    assert low < sum(math.prod(s) for s in CONFIGS[name].parameter_shapes().values()) < high


def test_model_parameters_match_declared_shapes_and_forward_is_causal():
    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"])
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == CONFIGS["tiny"].parameter_shapes()
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])  # the future cannot leak back


def test_qk_norm_adds_the_declared_weights_and_makes_attention_blind_to_the_scale_of_q_and_k():
    """With qk-layernorm each head's queries and keys are RMS-normalised before the rotary embedding, so
    scaling W_q and W_k (what attention-logit growth does) leaves the model's output unchanged; without it the
    output moves. The two head_dim weights per block are in the declared shapes (and count as norm weights)."""
    from dataclasses import replace

    from spamopt.spikes.layers import layer_type

    config = replace(CONFIGS["tiny"], qk_norm=True)
    torch.manual_seed(0)
    model = Llama(config)
    shapes = config.parameter_shapes()
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert shapes["layers.0.attn.q_norm.weight"] == (16,) and layer_type("layers.0.attn.q_norm.weight") == "norm"
    tokens = torch.randint(0, 256, (2, 12))
    for qk_norm in (True, False):
        torch.manual_seed(0)
        model = Llama(replace(config, qk_norm=qk_norm))
        before = model(tokens)
        with torch.no_grad():
            for block in model.layers:
                block.attn.q.weight.mul_(30.0)
                block.attn.k.weight.mul_(30.0)
        after = model(tokens)
        if qk_norm:
            torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
        else:
            assert (after - before).abs().max() > 1e-2


def test_recorded_attention_logits_are_the_largest_causal_logits():
    """``record_attention_logits``: each layer keeps max over batch, heads and pairs key <= query of q·k/√d,
    checked against a float64 loop over the pairs, with q and k recomputed here from the layer's weights; off
    by default, not updated when switched off again, and the forward output is the same with it on."""
    from spamopt.experiments.lm.model import _rotary

    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"])
    tokens = torch.randint(0, 256, (2, 10))
    plain = model(tokens)
    assert model.attention_logits() == [None] * len(model.layers)
    model.record_attention_logits(True)
    torch.testing.assert_close(model(tokens), plain, rtol=0, atol=0)
    recorded = model.attention_logits()
    x = model.embed(tokens)
    cos, sin = model.cos[:10], model.sin[:10]
    for block, largest in zip(model.layers, recorded):
        attn, normed = block.attn, block.attn_norm(x)
        b, t, h = normed.shape
        split = lambda y: y.view(b, t, attn.heads, h // attn.heads).transpose(1, 2)  # noqa: E731
        q = _rotary(split(attn.q(normed)), cos, sin).double()
        k = _rotary(split(attn.k(normed)), cos, sin).double()
        oracle = max(float(q[i, j, s] @ k[i, j, r]) / math.sqrt(q.shape[-1])
                     for i in range(b) for j in range(attn.heads) for s in range(t) for r in range(s + 1))
        assert float(largest) == pytest.approx(oracle, rel=1e-5)
        x = block(x, cos, sin)
    model.record_attention_logits(False)
    model(tokens)
    assert [float(v) for v in model.attention_logits()] == [float(v) for v in recorded]  # not updated when off
