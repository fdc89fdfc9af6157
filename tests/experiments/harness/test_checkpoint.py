"""Checkpoints are written atomically (a crash mid-write leaves the previous one whole) and rebuild only
allow-listed optimizer-state objects."""

from __future__ import annotations

import pytest
import torch

from spamopt import SPAM
from spamopt.experiments.harness import checkpoint


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = SPAM(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """torch.save dies halfway through the second checkpoint: the file still holds the first, loadable, and
    the half-written temporary never replaced it."""
    model, optimizer = _model_and_optimizer()
    path = tmp_path / checkpoint.CHECKPOINT
    checkpoint.save(path, model=model, optimizer=optimizer, rank=0, distributed=False, step=1)
    saved_weight = model.weight.detach().clone()
    real_save = torch.save

    def dies_halfway(payload, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, model=model, optimizer=optimizer, rank=0, distributed=False, step=2)
    monkeypatch.setattr(torch, "save", real_save)
    fresh, fresh_optimizer = _model_and_optimizer()
    with torch.no_grad():
        fresh.weight.zero_()
    extra = checkpoint.load(path, model=fresh, optimizer=fresh_optimizer, distributed=False)
    assert extra["step"] == 1
    assert torch.equal(fresh.weight, saved_weight)


def test_only_registered_state_objects_are_rebuilt():
    with pytest.raises(ValueError, match="unknown class 'os.Evil'"):
        checkpoint._decode({"class": "os.Evil", "attributes": {}})
    assert "galore_torch.galore_projector.GaLoreProjector" in checkpoint.STATE_OBJECTS  # registered by the registry
