"""SPAM's arithmetic against oracles written by someone else: the spec's equations (a float64 numpy
reimplementation in reference.py) and torch.optim.AdamW."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spamopt import SPAM
from spamopt.optim import schedule, sparse

from .reference import ReferenceSPAM
from .streams import set_grads, spiky_gradients

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, threshold=100.0, reset_interval=10,
             warmup_steps=4, clip_delay=3)
SPARSE_OVERRIDES = dict(lr=5e-3, threshold=50.0, density=0.3)


def _current_mask(opt, p):
    state = opt.state.get(p)
    if not state or "mask_bits" not in state:
        return None
    return sparse.unpack_mask(state["mask_bits"], p.numel()).view(p.shape).numpy().copy()


@pytest.mark.parametrize("reference_compat", [False, True], ids=["v0_unclipped", "reference_compat"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bias_correction_reset", [False, True])
def test_trajectory_matches_float64_reference_over_three_periods(foreach, bias_correction_reset, reference_compat):
    """Dense and sparse groups with per-group overrides, 1000x spikes, a lazily initialised parameter and
    a parameter that misses a step, over 27 steps (resets at 10 and 20, mask redraws after 9 and 19):
    every parameter and every moment equals the spec's float64 oracle to rounding, with coordinates whose v is
    0 left unclipped (default) or clipped to 0 (``reference_compat``; the lazily initialised vector joins at
    step 7, after the clip-free window, so the two modes differ on it)."""
    dense_shapes, sparse_shapes = [(24, 40), (17,)], [(64, 80), (9, 13), (5,)]
    steps = 27
    stream = spiky_gradients(dense_shapes + sparse_shapes, steps, seed=1)
    rng = np.random.default_rng(2)
    init = [rng.standard_normal(s) for s in dense_shapes + sparse_shapes]
    params = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    dense, sparse_group = params[:2], params[2:]
    opt = SPAM([{"params": dense}, {"params": sparse_group, **SPARSE_OVERRIDES}], foreach=foreach,
               bias_correction_reset=bias_correction_reset, reference_compat=reference_compat, **HYPER)
    common = dict(HYPER, bias_correction_reset=bias_correction_reset, reference_compat=reference_compat)
    ref_dense = ReferenceSPAM(init[:2], **common)
    ref_sparse = ReferenceSPAM(init[2:], **{**common, "lr": SPARSE_OVERRIDES["lr"],
                                            "threshold": SPARSE_OVERRIDES["threshold"]})
    for step, grads in enumerate(stream, start=1):
        grads = list(grads)
        if step <= 6 or step == 15:
            grads[1] = None  # the (17,) vector: first gradient at step 7, none at step 15
        masks = [_current_mask(opt, p) for p in sparse_group]
        set_grads(params, grads)
        opt.step()
        masks = [m if m is not None else _current_mask(opt, p) for m, p in zip(masks, sparse_group)]
        ref_dense.step(grads[:2])
        ref_sparse.step(grads[2:], masks)
        for p, ref in zip(params, ref_dense.params + ref_sparse.params):
            np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-12, atol=1e-15, err_msg=f"step {step}")
    assert ref_dense.clipped > 0 and ref_sparse.clipped > 0, "the stream must exercise clipping"
    for p, m, v in zip(dense, ref_dense.m, ref_dense.v):
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), m, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), v, rtol=1e-12, atol=1e-18)
    for p, m, mask in zip(sparse_group, ref_sparse.m, masks):
        state = opt.state[p]
        if p.dim() == 2:
            np.testing.assert_allclose(state["exp_avg"].numpy(), m[mask], rtol=1e-12, atol=1e-15)
        else:
            assert "mask_bits" not in state and state["exp_avg"].shape == p.shape  # 1-D stays dense


@pytest.mark.parametrize("foreach", [False, True])
def test_with_extras_disabled_equals_torch_adamw(foreach):
    """threshold=0, reset_interval=0, warmup_steps=0, eps=0, weight_decay=0: SPAM is AdamW (float64)."""
    torch.manual_seed(0)
    init = [torch.randn(7, 5, dtype=torch.float64), torch.randn(11, dtype=torch.float64)]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    spam = SPAM(ours, lr=3e-3, betas=(0.8, 0.95), eps=0.0, weight_decay=0.0, threshold=0.0, reset_interval=0,
                warmup_steps=0, foreach=foreach)
    adamw = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.8, 0.95), eps=0.0, weight_decay=0.0, foreach=False)
    for grads in spiky_gradients([(7, 5), (11,)], 60, seed=3):
        set_grads(ours, grads)
        set_grads(theirs, grads)
        spam.step()
        adamw.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def _steady_then_spike(spike_step, *, clip_delay, reset_interval=0, threshold=5000.0):
    """Run constant gradients 0.1 and plant g = -1e6 at coordinate 3 on ``spike_step``. Returns the
    moments before and after that step and the gradient."""
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    opt = SPAM([p], lr=1e-3, threshold=threshold, reset_interval=reset_interval, warmup_steps=0,
               clip_delay=clip_delay)
    for step in range(1, spike_step + 1):
        grad = torch.full((8,), 0.1, dtype=torch.float64)
        if step == spike_step:
            grad[3] = -1e6
            m0, v0 = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
        p.grad = grad
        opt.step()
    return m0, v0, opt.state[p]["exp_avg"], grad


def test_planted_spike_is_clipped_to_sign_times_sqrt_theta_v():
    """The clipped gradient entering the moments is exactly sign(g)·sqrt(θ·v_prev); others untouched."""
    m0, v0, m1, grad = _steady_then_spike(30, clip_delay=20)
    beta1 = 0.9
    clipped = -math.sqrt(5000.0 * v0[3].item())
    assert m1[3].item() == pytest.approx(beta1 * m0[3].item() + (1 - beta1) * clipped, rel=1e-14)
    others = [i for i in range(8) if i != 3]
    torch.testing.assert_close(m1[others], beta1 * m0[others] + (1 - beta1) * grad[others], rtol=1e-14, atol=0)


@pytest.mark.parametrize("spike_step", [5, 19])
def test_nothing_is_clipped_during_the_clip_delay(spike_step):
    m0, _, m1, grad = _steady_then_spike(spike_step, clip_delay=20)
    assert m1[3].item() == pytest.approx(0.9 * m0[3].item() + 0.1 * grad[3].item(), rel=1e-14)


def test_clip_delay_restarts_after_each_reset():
    """Reset at step 50: a spike 5 steps later passes unclipped, one 25 steps later is clipped."""
    m0, _, m1, grad = _steady_then_spike(55, clip_delay=20, reset_interval=50)
    assert m1[3].item() == pytest.approx(0.9 * m0[3].item() + 0.1 * grad[3].item(), rel=1e-14)
    m0, v0, m1, _ = _steady_then_spike(75, clip_delay=20, reset_interval=50)
    assert m1[3].item() == pytest.approx(0.9 * m0[3].item() - 0.1 * math.sqrt(5000.0 * v0[3].item()), rel=1e-14)


def test_moments_are_zeroed_at_the_start_of_step_reset_interval():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = SPAM([p], reset_interval=6, warmup_steps=0)
    for step in range(1, 7):
        p.grad = torch.zeros(4) if step == 6 else torch.ones(4)
        opt.step()
        if step == 5:
            assert opt.state[p]["exp_avg"].abs().min() > 0
    assert opt.state[p]["exp_avg"].abs().max() == 0 and opt.state[p]["exp_avg_sq"].abs().max() == 0


def test_warmup_multiplier_follows_the_spec_counter():
    """The derived multiplier equals the spec's stored counter c (starts at N+1, +1 per step, 0 after
    steps kΔT-1), and a reset step runs at s(0) = 0.01."""
    for interval, warmup in [(7, 3), (10, 4), (5, 0), (1, 2), (0, 5)]:
        c = warmup + 1
        for step in range(1, 40):
            expected = 1.0 - 0.99 * (1 + math.cos(math.pi * c / (warmup + 1))) / 2 if c < warmup else 1.0
            assert schedule.warmup_multiplier(step, interval, warmup) == pytest.approx(expected, abs=1e-15)
            c += 1
            if interval > 0 and (step + 1) % interval == 0:
                c = 0
    assert schedule.warmup_multiplier(500, 500, 150) == pytest.approx(0.01)
    assert schedule.warmup_multiplier(499, 500, 150) == 1.0


def _embedding_run(reference_compat: bool, clip_delay: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """An 8-row embedding whose rows 4-7 first get gradients at step 10 (tokens first seen late), clipping in
    force from step ``clip_delay``; returns (initial, final) weights after 20 steps."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(8, 4)
    start = embedding.weight.detach().clone()
    opt = SPAM(embedding.parameters(), lr=1e-2, clip_delay=clip_delay, reference_compat=reference_compat)
    for step in range(1, 21):
        tokens = torch.tensor([0, 1, 2, 3] + ([4, 5, 6, 7] if step >= 10 else []))
        opt.zero_grad()
        embedding(tokens).pow(2).sum().backward()
        opt.step()
    return start, embedding.weight.detach()


def test_rows_first_seen_late_move_unless_reference_compat():
    """Rows whose first gradient comes after the clip-free window have v = 0: by default they are not clipped
    and train; with ``reference_compat`` they are clipped to 0 and stay frozen, as in the released code. Rows
    seen from the start move identically in both modes."""
    start, default = _embedding_run(False)
    _, compat = _embedding_run(True)
    assert (default[4:] - start[4:]).abs().min() > 1e-3
    assert torch.equal(compat[4:], start[4:])
    assert torch.equal(default[:4], compat[:4]) and (default[:4] - start[:4]).abs().min() > 1e-3


@pytest.mark.parametrize("clip_delay", [0, 1])
def test_clip_delay_zero_or_one_trains(clip_delay):
    """With clipping in force from the first step every v is 0 then: the repaired rule lets the model train
    (the reference rule froze every parameter)."""
    start, default = _embedding_run(False, clip_delay=clip_delay)
    _, compat = _embedding_run(True, clip_delay=clip_delay)
    assert (default - start).abs().min() > 1e-3
    assert torch.equal(compat, start)


def test_warmup_longer_than_the_period_warns():
    with pytest.warns(UserWarning, match="warmup_steps=10 >= reset_interval=10"):
        SPAM([torch.nn.Parameter(torch.zeros(2))], reset_interval=10, warmup_steps=10)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_skipped_reset_step_still_zeroes_the_moments(foreach):
    """A non-finite gradient on a reset step (τ = 5) skips the update, so the parameter and the bias-correction
    count stay, but the reset belongs to the clock: the moments are zero afterwards."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = SPAM([p], lr=1e-2, reset_interval=5, warmup_steps=2, foreach=foreach)
    for step in range(1, 6):
        p.grad = torch.full((3,), float("nan") if step == 5 else 0.5)
        before, k = p.detach().clone(), opt.state[p]["step"].clone() if opt.state else None
        opt.step()
    assert torch.equal(p.detach(), before) and torch.equal(opt.state[p]["step"], k)
    assert opt.state[p]["exp_avg"].abs().max() == 0 and opt.state[p]["exp_avg_sq"].abs().max() == 0
    assert opt.state[p]["skipped_steps"] == 1
