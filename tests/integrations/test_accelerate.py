"""SPAM through ``accelerate``: ``Accelerator.prepare`` wraps it, bf16 autocast runs on the CPU, SPAM keeps fp32
moments for the fp32 master weights and counts one step per optimizer step, and ``save_state`` /
``load_state`` round-trip its state."""

from __future__ import annotations

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from spamopt import SPAM  # noqa: E402
from spamopt.groups import param_groups  # noqa: E402

from .tiny import TokenData, spam_options, tiny_llama  # noqa: E402


def test_prepare_with_bf16_autocast_on_the_cpu(tmp_path):
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    model = tiny_llama()
    optimizer = SPAM(param_groups(model, weight_decay=0.1), **spam_options())
    data = torch.utils.data.DataLoader(TokenData(), batch_size=4)
    model, prepared, data = accelerator.prepare(model, optimizer, data)
    losses = []
    for step, batch in zip(range(10), data):
        with accelerator.autocast():
            loss = model(**batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        prepared.step()
        prepared.zero_grad()
        losses.append(loss.item())
    assert prepared.optimizer is optimizer
    assert losses[-1] < losses[0]
    for param, state in optimizer.state.items():
        assert param.dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
        assert int(state["global_step"]) == 10
    accelerator.save_state(str(tmp_path / "state"))
    saved = {k: v.clone() for k, v in optimizer.state[next(iter(optimizer.state))].items()}
    for state in optimizer.state.values():
        state["exp_avg"].zero_()
    accelerator.load_state(str(tmp_path / "state"))
    for key, value in optimizer.state[next(iter(optimizer.state))].items():
        assert torch.equal(value, saved[key]), key
