"""Sparse momentum: the kept subset, when it is redrawn, what moves, and what it costs in memory."""

from __future__ import annotations

import pytest
import torch

from spamopt import SPAM
from spamopt.optim import compiled, sparse

from .stress import run_steps


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


@pytest.mark.parametrize("with_numpy", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("numel", [0, 1, 13, 4096, 3 * 4096 + 5])
def test_kept_index_lists_the_set_bits_in_order(monkeypatch, numel, with_numpy):
    """The positions ``kept_index`` finds, with numpy (the CPU's fast path) and without (torch's ``nonzero``,
    also the path on other devices), are the indices of the unpacked mask's True entries, ascending, int64,
    for lengths that are no multiple of 8 or of a stratum."""
    if not with_numpy:
        monkeypatch.setattr(sparse, "_numpy", None)
    elif sparse._numpy is None:
        pytest.skip("numpy is not installed")
    bits = sparse.draw_mask(numel, 0.3, seed=4, generation=2, device="cpu")
    mask = sparse.unpack_mask(bits, numel)
    expected = [i for i, kept in enumerate(mask.tolist()) if kept]
    found = sparse.kept_index(bits, numel)
    assert found.dtype == torch.int64 and found.tolist() == expected
    assert len(expected) == sparse.kept_count(numel, 0.3)


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


_IMPLEMENTATIONS = [pytest.param({"foreach": False, "compiled": False}, id="forloop"),
                    pytest.param({"foreach": True}, id="foreach"),
                    pytest.param({"compiled": True}, id="compiled",
                                 marks=pytest.mark.skipif(not compiled.compiled_available("cpu"),
                                                          reason="torch.compile needs a C++ compiler"))]


@pytest.mark.parametrize("implementation", _IMPLEMENTATIONS)
def test_sparse_momentum_steps_under_torch_deterministic_mode(implementation):
    """``torch.use_deterministic_algorithms(True)`` refuses some indexed writes (``put_``); a sparse step must not
    use them, and gives the same weights as without the mode."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 96)) for _ in range(2)]
    grads = [torch.randn(64, 96) for _ in range(3)]
    results = []
    for deterministic in (False, True):
        params = [torch.nn.Parameter(w.detach().clone()) for w in weights]
        opt = SPAM(params, density=0.25, **implementation)
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


def _counting_searches(monkeypatch) -> list[int]:
    """Count the calls of :func:`sparse.kept_index` (the search of the bitmask), wherever they come from."""
    calls = []
    search = sparse.kept_index

    def counted(bits, numel):
        calls.append(numel)
        return search(bits, numel)

    monkeypatch.setattr(sparse, "kept_index", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("implementation", _IMPLEMENTATIONS)
def test_kept_positions_spare_the_search_and_change_nothing_else(implementation, dtype, monkeypatch):
    """``keep_positions=True`` searches each mask once (4 sparse matrices x 3 masks over 12 steps with redraws
    after steps 4 and 9, where the default searches every step: 48), keeps them in int32, and gives bit for bit
    the parameters and moments of the default on the stress set (so a stale position after a redraw would show),
    for fp32 and for bf16 matrices (updated on fp32 copies)."""
    calls = _counting_searches(monkeypatch)
    params, opt, counts = run_steps(implementation, dtype, 0.25)
    assert len(calls) == 48
    calls.clear()
    kept_params, kept_opt, kept_counts = run_steps(implementation, dtype, 0.25, keep_positions=True)
    assert len(calls) == 12
    assert {t.dtype for t in kept_opt.kept_positions().values()} == {torch.int32} and not opt.kept_positions()
    assert counts == kept_counts
    for ref, got in zip(params, kept_params):
        assert torch.equal(got, ref)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(kept_opt.state[got][key], opt.state[ref][key])


def test_kept_positions_are_found_again_for_a_loaded_mask(monkeypatch):
    """A checkpoint's masks replace the optimizer's: the loaded run continues bit for bit as the run that wrote
    the checkpoint (positions kept from the optimizer's own, older masks would move other coordinates), searching
    the loaded mask once and the next period's once; a mask changed in place is searched again too."""
    def make(params):
        return SPAM(params, density=0.25, reset_interval=4, warmup_steps=2, clip_delay=0, keep_positions=True)

    torch.manual_seed(0)
    grads = [torch.randn(96, 64) for _ in range(8)]
    steady = torch.nn.Parameter(torch.randn(96, 64))
    opt = make([steady])
    for step, g in enumerate(grads):
        steady.grad = g.clone()
        opt.step()
        if step == 4:  # 5 steps done: the second period's mask (redrawn after step 3)
            saved = opt.state_dict()
            saved["state"] = {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()}
            weights_at_save = steady.detach().clone()
    resumed = torch.nn.Parameter(torch.randn(96, 64))
    fresh = make([resumed])
    for g in grads[:2]:  # keeps the first period's positions
        resumed.grad = g.clone()
        fresh.step()
    calls = _counting_searches(monkeypatch)
    fresh.load_state_dict(saved)
    with torch.no_grad():
        resumed.copy_(weights_at_save)
    for g in grads[5:]:  # steps 6-8; the third period's mask is drawn after step 7
        resumed.grad = g.clone()
        fresh.step()
    assert torch.equal(resumed, steady)
    assert len(calls) == 2
    fresh.state[resumed]["mask_bits"].copy_(sparse.draw_mask(resumed.numel(), 0.25, seed=1, generation=9,
                                                             device="cpu"))
    resumed.grad = grads[0].clone()
    fresh.step()
    assert len(calls) == 3
