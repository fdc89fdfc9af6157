"""Sparse momentum: the kept subset, when it is redrawn, what moves, and what it costs in memory."""

from __future__ import annotations

import pytest
import torch

from spamopt import SPAM
from spamopt.optim import sparse


def _state_bytes(state):
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("density", [0.25, 0.5, 0.1])
def test_sparse_state_is_within_the_memory_bar(density):
    """fp32 512x1376 matrix (LLaMA-60M MLP shape): state <= (8·d + 0.25) bytes per element."""
    weight = torch.nn.Parameter(torch.zeros(512, 1376))
    opt = SPAM([weight], density=density)
    weight.grad = torch.randn_like(weight)
    opt.step()
    assert _state_bytes(opt.state[weight]) <= (8 * density + 0.25) * weight.numel()
    dense = SPAM([weight])
    dense.step()
    assert _state_bytes(opt.state[weight]) < (density + 0.02) * _state_bytes(dense.state[weight])


def test_kept_subset_has_the_requested_density_everywhere():
    numel = 4096 * 5 + 1000
    mask = sparse.unpack_mask(sparse.draw_mask(numel, 0.25, seed=3, generation=0, device="cpu"), numel)
    assert int(mask.sum()) == sparse.kept_count(numel, 0.25) == 5 * 1024 + 250
    per_stratum = mask[: 4096 * 5].view(5, 4096).sum(1)
    assert (per_stratum == 1024).all()


def test_draws_are_regenerable_and_differ_between_periods_and_seeds():
    draw = lambda seed, gen: sparse.draw_mask(10_000, 0.3, seed, gen, "cpu")  # noqa: E731
    assert torch.equal(draw(1, 2), draw(1, 2))
    assert not torch.equal(draw(1, 2), draw(1, 3))
    assert not torch.equal(draw(1, 2), draw(2, 2))


def test_pack_unpack_round_trip_for_odd_lengths():
    for numel in (1, 7, 8, 9, 4095, 4097):
        flat = torch.rand(numel) < 0.5
        padded = torch.zeros((numel + 7) // 8 * 8, dtype=torch.bool)
        padded[:numel] = flat
        assert torch.equal(sparse.unpack_mask(sparse._pack(padded), numel), flat)


def test_masks_are_redrawn_after_steps_k_interval_minus_one_only():
    weight = torch.nn.Parameter(torch.zeros(64, 64))
    opt = SPAM([weight], density=0.25, reset_interval=5)
    masks = []
    for _ in range(14):
        weight.grad = torch.randn_like(weight)
        opt.step()
        masks.append(opt.state[weight]["mask_bits"].clone())  # mask in force for the *next* step
    changed = [step for step in range(2, 15) if not torch.equal(masks[step - 2], masks[step - 1])]
    assert changed == [4, 9, 14]  # redrawn at the end of steps ΔT-1, 2ΔT-1, 3ΔT-1


def test_only_kept_coordinates_move_and_weight_decay_reaches_all():
    weight = torch.nn.Parameter(torch.ones(32, 48))
    opt = SPAM([weight], density=0.25, reset_interval=0, lr=0.1)
    weight.grad = torch.randn_like(weight)
    opt.step()
    kept = sparse.unpack_mask(opt.state[weight]["mask_bits"], weight.numel()).view(32, 48)
    assert (weight[~kept] == 1).all() and (weight[kept] != 1).all()
    decayed = torch.nn.Parameter(torch.ones(32, 48))
    opt = SPAM([decayed], density=0.25, reset_interval=0, lr=0.1, weight_decay=0.5)
    decayed.grad = torch.zeros_like(decayed)
    opt.step()
    torch.testing.assert_close(decayed.detach(), torch.full((32, 48), 0.95))


def test_non_matrices_in_a_sparse_group_stay_dense():
    params = [torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(2, 3, 4)),
              torch.nn.Parameter(torch.zeros(6, 6))]
    opt = SPAM(params, density=0.5)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert ["mask_bits" in opt.state[p] for p in params] == [False, False, True]
    assert opt.state[params[2]]["exp_avg"].shape == (18,)


def test_masks_follow_the_process_seed():
    def first_mask(seed):
        torch.manual_seed(seed)
        weight = torch.nn.Parameter(torch.zeros(40, 40))
        opt = SPAM([weight], density=0.5)
        weight.grad = torch.ones_like(weight)
        opt.step()
        return opt.state[weight]["mask_bits"]

    assert torch.equal(first_mask(1), first_mask(1))
    assert not torch.equal(first_mask(1), first_mask(2))


@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_gather_and_scatter_move_exactly_the_kept_coordinates_in_row_major_order(transposed):
    """The indexed copies equal torch's boolean-mask copies (``masked_select`` / ``masked_scatter_``, the oracle)
    for a contiguous matrix and a transposed view of one."""
    numel = 4096 + 300
    bits = sparse.draw_mask(numel, 0.25, seed=5, generation=1, device="cpu")
    mask = sparse.unpack_mask(bits, numel)
    kept = sparse.kept_index(bits, numel)
    assert kept.dtype == torch.int64 and torch.equal(kept, mask.nonzero().squeeze(1))
    base = torch.randn(numel).view(4396 // 4, 4)
    tensor = base.t() if transposed else base
    assert tensor.is_contiguous() is not transposed
    shaped = mask.view(tensor.shape)
    assert torch.equal(sparse.gather(tensor, kept), tensor.masked_select(shaped))
    values = torch.randn(len(kept))
    expected = tensor.clone().masked_scatter_(shaped, values)
    sparse.scatter_(tensor, kept, values)
    assert torch.equal(tensor, expected)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_sparse_momentum_steps_under_torch_deterministic_mode(foreach):
    """``torch.use_deterministic_algorithms(True)`` refuses some indexed writes (``put_``); a sparse step must not
    use them, and gives the same weights as without the mode."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 96)) for _ in range(2)]
    grads = [torch.randn(64, 96) for _ in range(3)]
    results = []
    for deterministic in (False, True):
        params = [torch.nn.Parameter(w.detach().clone()) for w in weights]
        opt = SPAM(params, density=0.25, foreach=foreach, compiled=False)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            for g in grads:
                for p in params:
                    p.grad = g.clone()
                opt.step()
        finally:
            torch.use_deterministic_algorithms(previous)
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
