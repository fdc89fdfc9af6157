"""The optimizer registry on the LLaMA (its layout: block matrices, width, heads, Adam-mini's name patterns):
every installed name builds and steps, spam-sparse keeps a quarter of the block matrices' moments, a missing
baseline names its extra."""

from __future__ import annotations

import builtins
import sys

import pytest
import torch

from spamopt.experiments.harness.optimizers import OPTIMIZERS, build_optimizer, register_optimizer, state_bytes
from spamopt.experiments.lm.config import CONFIGS, optimizer_layout
from spamopt.experiments.lm.model import Llama

LAYOUT = optimizer_layout(CONFIGS["tiny"])


def test_every_installed_optimizer_builds_and_steps():
    """Each name builds on the tiny LLaMA and changes the weights in one step; a missing package is reported
    with the extra that installs it."""
    built = []
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        model = Llama(CONFIGS["tiny"])
        try:
            setup = build_optimizer(name, model, LAYOUT, lr=1e-2)
        except ImportError as error:
            assert "pip install 'spamopt[" in str(error)
            continue
        before = [p.detach().clone() for p in model.parameters()]
        tokens = torch.randint(0, 256, (2, 17))
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        if setup.clipper is not None:
            setup.clipper(model)
        setup.optimizer.step()
        moved = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert moved >= len(before) // 2, name
        assert state_bytes(setup.optimizer) > 0, name
        built.append(name)
    assert {"adamw", "adam-clip", "spam", "spam-sparse"} <= set(built)


def test_spam_sparse_keeps_a_quarter_of_the_block_matrices_moments():
    model, layout = Llama(CONFIGS["mini"]), optimizer_layout(CONFIGS["mini"])
    dense, sparse = (build_optimizer(n, model, layout, lr=1e-3).optimizer for n in ("spam", "spam-sparse"))
    for opt in (dense, sparse):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    matrices = sum(p.numel() for n, p in model.named_parameters() if ".attn." in n or ".mlp." in n)
    saved = state_bytes(dense) - state_bytes(sparse)
    assert saved == pytest.approx(matrices * 8 * 0.75 - matrices / 8, rel=0.01)


def test_a_missing_baseline_names_its_extra(monkeypatch):
    real_import = builtins.__import__

    def no_lion(name, *args, **kwargs):
        if name.startswith("lion_pytorch"):
            raise ImportError("No module named 'lion_pytorch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lion)
    monkeypatch.delitem(sys.modules, "lion_pytorch", raising=False)
    with pytest.raises(ImportError, match=r"spamopt\[baselines\].*lion-pytorch"):
        build_optimizer("lion", Llama(CONFIGS["tiny"]), LAYOUT, lr=1e-3)
    with pytest.raises(ValueError, match="Invalid optimizer value: 'sgd'"):
        build_optimizer("sgd", Llama(CONFIGS["tiny"]), LAYOUT, lr=1e-3)


def test_adam_mini_gets_the_llama_name_patterns():
    """Adam-mini partitions by name substrings; its defaults would take ``mlp_norm`` for an MLP matrix, so the
    layout's patterns replace them."""
    pytest.importorskip("adam_mini")
    optimizer = build_optimizer("adam-mini", Llama(CONFIGS["tiny"]), LAYOUT, lr=1e-3).optimizer
    assert optimizer.mlp_names == {"mlp.gate.", "mlp.up.", "mlp.down."} and optimizer.output_names == {"head."}


def test_a_registered_name_is_built_and_a_duplicate_refused(monkeypatch):
    monkeypatch.setattr("spamopt.experiments.harness.optimizers.OPTIMIZERS", dict(OPTIMIZERS))
    from spamopt.experiments.harness import optimizers

    register_optimizer("sgd", lambda model, layout, lr, wd, options: optimizers.OptimizerSetup(
        torch.optim.SGD(model.parameters(), lr=lr)))
    assert isinstance(build_optimizer("sgd", Llama(CONFIGS["tiny"]), LAYOUT, lr=0.1).optimizer, torch.optim.SGD)
    with pytest.raises(ValueError, match="Invalid optimizer name: 'spam'"):
        register_optimizer("spam", lambda *args: None)


@pytest.mark.parametrize("name", ["adamw+adagn", "lion+adagn", "adam-mini+adagn", "stable-spam"])
def test_stable_spam_and_wrapped_baselines_build_and_train(name):
    """``stable-spam`` and ``NAME+adagn`` (the paper's Table 3: a baseline behind AdaClip + AdaGN) come from the
    registry; wrapper options reach the wrapper, the rest the wrapped optimizer; ten steps lower the loss."""
    from spamopt import AdaClipGN, StableSPAM

    if name.startswith(("lion", "adam-mini")):
        pytest.importorskip(name.split("+")[0].replace("-", "_").replace("lion", "lion_pytorch"))
    torch.manual_seed(0)
    model = Llama(CONFIGS["tiny"])
    options = {"gamma3": 0.99} if name.endswith("+adagn") else {"adaclip": "off", "adagn": False}
    optimizer = build_optimizer(name, model, LAYOUT, lr=3e-3, options=options).optimizer
    if name == "stable-spam":
        assert isinstance(optimizer, StableSPAM) and optimizer.defaults["adagn"] is False
    else:
        assert isinstance(optimizer, AdaClipGN) and optimizer.settings["gamma3"] == 0.99
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match=r"Invalid optimizer value: 'sgd\+adagn'"):
        build_optimizer("sgd+adagn", model, LAYOUT, lr=1e-3)
