"""SPAM under ``torch.amp.GradScaler`` (mixed-precision loss scaling): the scaler hands SPAM its scale and inf
flag, SPAM unscales inside the step and skips a step the scaler flags, and nothing is read back on the host."""

from __future__ import annotations

import pytest
import torch

from spamopt import SPAM

from .probes import HostReads

IMPLEMENTATIONS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True),
                   "compiled": dict(compiled=True)}
SMALL = dict(lr=1e-2, reset_interval=4, warmup_steps=2, clip_delay=1, threshold=5.0)
OVERFLOW_STEP = 5  # a gradient coordinate is made infinite after this step's backward


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def _train(model, opt, scaler=None, steps=10, unscale_first=False):
    """Regression on fixed random data; with a scaler the loss is scaled, and at ``OVERFLOW_STEP`` one gradient
    coordinate becomes infinite (as a scale overflow would make it)."""
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x, y = torch.randn(24, 12, generator=gen), torch.randn(24, 3, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if step == OVERFLOW_STEP:
            model[0].weight.grad[0, 0] = float("inf")
        if scaler is None:
            opt.step()
            continue
        if unscale_first:  # as before gradient-norm clipping: the scaler unscales p.grad itself
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscaled_by_user"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_scaled_training_equals_unscaled_training(implementation, unscale_first):
    """A run under a GradScaler (scale 2^12, growing every 3 good steps) ends bit-identical to the same run
    without one: scaling by a power of two is exact, SPAM divides it back out, and the overflow step is
    skipped in both (by the scaler's flag in one, by SPAM's own non-finite check in the other). The scale
    itself halves at the overflow, so the flag reached the scaler's bookkeeping."""
    plain_model, scaled_model = _model(), _model()
    plain = SPAM(plain_model.parameters(), **SMALL, **IMPLEMENTATIONS[implementation])
    scaled = SPAM(scaled_model.parameters(), **SMALL, **IMPLEMENTATIONS[implementation])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    _train(plain_model, plain)
    _train(scaled_model, scaled, scaler, unscale_first=unscale_first)
    for ours, reference in zip(scaled_model.parameters(), plain_model.parameters()):
        assert torch.equal(ours, reference)
        for key in ("exp_avg", "exp_avg_sq", "step", "skipped_steps"):
            assert torch.equal(scaled.state[ours][key], plain.state[reference][key]), key
    assert all(int(s["skipped_steps"]) == 1 for s in scaled.state.values())
    # 4 good steps (one growth to 2^13), the overflow (back to 2^12), 5 good steps (one growth to 2^13).
    assert scaler.get_scale() == 2.0**13


def test_scaled_run_matches_torch_adamw_under_the_same_scaler():
    """Oracle written by others: with clipping, resets, warmup and weight decay off and ε = 0, SPAM is AdamW. Under one
    GradScaler configuration, torch's AdamW (unscaled by the scaler, the step skipped on the host) and SPAM
    (unscaled inside its step, skipped on the device) end at the same weights."""
    ours_model, theirs_model = _model(), _model()
    adam_like = dict(lr=1e-2, betas=(0.9, 0.99), eps=0.0, weight_decay=0.0)  # SPAM decays after the update
    ours = SPAM(ours_model.parameters(), threshold=0.0, reset_interval=0, warmup_steps=0, **adam_like)
    theirs = torch.optim.AdamW(theirs_model.parameters(), foreach=False, **adam_like)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3) for _ in range(2)]
    _train(ours_model, ours, scalers[0])
    _train(theirs_model, theirs, scalers[1])
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert scalers[0].get_scale() == scalers[1].get_scale()


@pytest.mark.parametrize("capturable", [False, True])
def test_scaler_step_and_update_read_nothing_on_the_host(capturable):
    """``scaler.step(SPAM)`` plus ``scaler.update()`` make no host-waiting operation (probes.py), including
    the overflow step. Torch's AdamW without a fused kernel, under the same scaler, reads the inf flag on the
    host — the synchronisation that SPAM's ``_step_supports_amp_scaling`` avoids, and proof the check sees it."""

    def reads_during_scaler_steps(model, opt):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        gen = torch.Generator().manual_seed(1)
        seen = []
        for step in range(1, 8):
            x = torch.randn(24, 12, generator=gen)
            opt.zero_grad(set_to_none=True)
            scaler.scale((model(x) ** 2).mean()).backward()
            if step == OVERFLOW_STEP:
                model[0].weight.grad[0, 0] = float("inf")
            host_state = [] if capturable else [s["global_step"] for s in getattr(opt, "state", {}).values()
                                                if "global_step" in s]
            with HostReads(allowed=host_state) as reads:
                scaler.step(opt)
                scaler.update()
            seen += reads.seen if step > 1 else []  # step 1 creates the state
        return seen

    model = _model()
    assert reads_during_scaler_steps(model, SPAM(model.parameters(), fused=True, capturable=capturable)) == []
    model = _model()
    assert reads_during_scaler_steps(model, torch.optim.AdamW(model.parameters(), foreach=False)) != []


@pytest.mark.parametrize("skip_nonfinite", [True, False])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_found_inf_skips_the_step_and_grad_scale_divides_the_gradients(implementation, skip_nonfinite):
    """The protocol itself, as GradScaler drives it: with ``found_inf`` set, nothing moves even though every
    gradient is finite and even where ``skip_nonfinite=False`` (torch's optimizers skip flagged steps too);
    then with ``grad_scale = 4`` and gradients 4·g, the step equals a plain step on g. (Clipping and resets
    are off: the flagged step advances the clock, which the plain optimizer never saw.)"""
    options = dict(lr=1e-2, threshold=0.0, reset_interval=0, skip_nonfinite=skip_nonfinite,
                   **IMPLEMENTATIONS[implementation])
    model, reference_model = _model(), _model()
    opt, reference = SPAM(model.parameters(), **options), SPAM(reference_model.parameters(), **options)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.grad_scale, opt.found_inf = torch.tensor([4.0]), torch.tensor([1.0])
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(int(s["skipped_steps"]) == 1 and int(s["step"]) == 0 for s in opt.state.values())
    gen = torch.Generator().manual_seed(2)
    for p, q in zip(model.parameters(), reference_model.parameters()):
        q.grad = torch.randn(p.shape, generator=gen)
        p.grad = q.grad * 4.0
    opt.found_inf = torch.tensor([0.0])
    opt.step()
    del opt.grad_scale, opt.found_inf
    reference.step()
    for p, q, b in zip(model.parameters(), reference_model.parameters(), before):
        assert torch.equal(p, q) and not torch.equal(p, b)
