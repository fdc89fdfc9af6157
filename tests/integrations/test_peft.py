"""SPAM over PEFT LoRA adapters: only the adapter parameters get optimizer state (the frozen base none, checked
by the state's size), ``density`` applies to the adapter matrices, and training moves only the adapters."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from spamopt import SPAM  # noqa: E402
from spamopt.groups import param_groups  # noqa: E402

from .tiny import TokenData, spam_options, tiny_llama  # noqa: E402


def test_spam_over_lora_adapters_only():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              lora_dropout=0.0))
    adapters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    groups = param_groups(model, density=0.5)
    assert [len(g["params"]) for g in groups] == [len(adapters)] and groups[0]["density"] == 0.5
    optimizer = SPAM(groups, **spam_options())
    data = torch.utils.data.DataLoader(TokenData(), batch_size=4)
    for _, batch in zip(range(3), data):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert {id(p) for p in optimizer.state} == {id(p) for p in adapters.values()}
    for param, state in optimizer.state.items():  # sparse: compact moments of half the coordinates, and a mask
        kept = state["exp_avg"].numel()
        assert "mask_bits" in state and abs(kept - param.numel() / 2) <= param.numel() * 0.02
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
    adapter_numel = sum(p.numel() for p in adapters.values())
    assert state_bytes < 6 * adapter_numel  # two fp32 half-size moments, masks and counters: no base state
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
