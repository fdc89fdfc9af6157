"""A tiny ``LlamaForCausalLM`` built from a config (no weights downloaded) and a fixed token data set, shared by
the integration tests."""

from __future__ import annotations

import torch

VOCAB, LENGTH, EXAMPLES = 64, 16, 48


def tiny_llama(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LENGTH)
    return transformers.LlamaForCausalLM(config)


class TokenData(torch.utils.data.Dataset):
    """Sequences with a learnable rule (each token is the previous plus one, modulo the vocabulary)."""

    def __init__(self, examples: int = EXAMPLES, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (examples, 1), generator=gen)
        self.ids = (starts + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def spam_options() -> dict:
    """A reset at optimizer step 8 with a 3-step warmup and clipping on from step 2: a 12-step run crosses it."""
    return dict(lr=1e-2, reset_interval=8, warmup_steps=3, clip_delay=2, threshold=50.0)


def assert_same_training(a_params, a_opt, b_params, b_opt) -> None:
    """Parameters and every optimizer-state tensor equal bit for bit."""
    for (name, pa), pb in zip(a_params, b_params):
        assert torch.equal(pa, pb), name
    a_state, b_state = a_opt.state_dict()["state"], b_opt.state_dict()["state"]
    assert a_state.keys() == b_state.keys() and a_state
    for key in a_state:
        for field, value in a_state[key].items():
            assert torch.equal(value, b_state[key][field]), (key, field)
