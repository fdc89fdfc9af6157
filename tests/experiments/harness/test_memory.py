"""Optimizer-state memory: the formulas against the real optimizers' state, the paper's matched densities,
state bytes per registry name against a hand count on a small model, and the measured peak of a training step."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from spamopt import SPAM
from spamopt.experiments.harness.memory import (galore_held_bytes, galore_state_bytes, matched_density, resident_bytes,
                                               sparse_spam_state_bytes, step_peak_memory)
from spamopt.experiments.harness.optimizers import build_optimizer, state_bytes
from spamopt.experiments.lm.compare import matched_memory
from spamopt.experiments.lm.config import CONFIGS, is_block_matrix, optimizer_layout
from spamopt.experiments.lm.model import Llama


def _block_shapes(model: str) -> list[tuple[int, ...]]:
    return [s for n, s in CONFIGS[model].parameter_shapes().items() if is_block_matrix(n, s)]


@pytest.mark.parametrize("model,rank,paper", [("60m", 128, 0.3225), ("130m", 256, 0.4306)])
def test_the_papers_matched_densities_come_out(model, rank, paper):
    """GaLore's state at the paper's rank over the attention and MLP matrices, as sparse-SPAM moments, gives
    the paper's density. (At 350m/1b, ranks 256/512, it gives 0.3228/0.3229; the paper reused 0.3225.)"""
    assert matched_density(_block_shapes(model), galore_state_bytes(_block_shapes(model), rank)) == paper
    assert matched_memory(f"galore:{rank}", model)["density"] == paper


def _galore(shapes, rank=32):
    galore_torch = pytest.importorskip("galore_torch")
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = galore_torch.GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                                     "proj_type": "std"}])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_galore_formulas_against_galore_torchs_own_state():
    """The state galore-torch keeps alive is the held formula (its projector slices a whole SVD factor); the
    nominal formula counts the projector's own elements, as the paper did."""
    shapes = [(344, 128), (128, 344), (64, 64)]
    opt = _galore(shapes)
    assert state_bytes(opt) == galore_held_bytes(shapes, 32)
    nominal = sum(s.numel() * s.element_size() for st in opt.state.values() for s in
                  [st["exp_avg"], st["exp_avg_sq"], st["projector"].ortho_matrix])
    assert nominal == galore_state_bytes(shapes, 32) < galore_held_bytes(shapes, 32)


def test_state_bytes_counts_the_whole_storage_a_slice_keeps_alive():
    """A state entry that is a slice of a larger tensor keeps all of it: counted whole, and once."""
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([param])
    factor = torch.zeros(100, 100)
    opt.state[param] = {"left": factor[:, :10], "right": factor[:10]}
    assert state_bytes(opt) == factor.numel() * 4


@pytest.mark.parametrize("name", ["galore", "adam-mini", "spam", "spam-sparse", "stable-spam"])
def test_state_bytes_equals_torchs_memory_tracker(name):
    """``state_bytes`` agrees with torch's MemTracker, which attributes every live storage to the optimizer
    state, parameters, gradients, ... (a tiny LLaMA, one step)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    if name == "galore":
        pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    config = dataclasses.replace(CONFIGS["tiny"], vocab=512)
    model = Llama(config)
    setup = build_optimizer(name, model, optimizer_layout(config), lr=1e-3)
    tracker = MemTracker()
    tracker.track_external(model, setup.optimizer)
    with tracker:
        model(torch.randint(0, config.vocab, (2, 16))).logsumexp(-1).mean().backward()
        setup.optimizer.step()
    tracked = tracker.get_tracker_snapshot()[torch.device("cpu")][_MemRefType.OPT]
    assert state_bytes(setup.optimizer) == tracked


def test_state_bytes_counts_the_kept_positions_held_beside_the_state():
    """With ``keep_positions=True`` a sparse matrix's int32 positions stay alive between steps outside
    ``optimizer.state``: the harness's memory figure counts them (4 bytes per kept coordinate) instead of
    reporting the memory of the option off."""
    shapes = [(344, 128), (70, 90)]
    figures = []
    for keep in (False, True):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = SPAM(params, density=0.3, keep_positions=keep)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        figures.append(state_bytes(opt))
    kept = sum(opt.state[p]["exp_avg"].numel() for p in params)
    assert figures[1] - figures[0] == 4 * kept > 0


def test_sparse_spam_formula_equals_spams_own_state():
    shapes = [(344, 128), (70, 90)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = SPAM(params, density=0.3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    measured = sum(opt.state[p][k].numel() * opt.state[p][k].element_size() for p in params
                   for k in ("exp_avg", "exp_avg_sq", "mask_bits"))
    assert measured == sparse_spam_state_bytes(shapes, 0.3)


def test_state_bytes_per_registry_name_against_a_hand_count():
    """Tiny LLaMA, fp32, P parameters in T tensors (B of them in block matrices): AdamW keeps two moments and a
    4-byte step per tensor; SPAM adds an 8-byte clock and a 4-byte skip count; Stable-SPAM four 8-byte
    (float64) statistics more; spam-sparse keeps a quarter of the block matrices' moments plus their bitmasks."""
    torch.manual_seed(0)
    layout = optimizer_layout(CONFIGS["tiny"])
    model = Llama(CONFIGS["tiny"])
    params = list(model.parameters())
    total, tensors = sum(p.numel() for p in params), len(params)
    blocks = [p for n, p in model.named_parameters() if is_block_matrix(n, p.shape)]
    expected = {
        "adamw": 8 * total + 4 * tensors,
        "spam": 8 * total + 16 * tensors,
        "stable-spam": 8 * total + 48 * tensors,
        "spam-sparse": 8 * (total - sum(p.numel() for p in blocks)) + 16 * tensors + 8 * len(blocks)
        + sparse_spam_state_bytes([tuple(p.shape) for p in blocks], 0.25),
    }
    for name, hand in expected.items():
        setup = build_optimizer(name, model, layout, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        setup.optimizer.step()
        assert state_bytes(setup.optimizer) == hand, name


def test_a_budget_that_no_density_fits_is_refused():
    shapes = _block_shapes("tiny")
    with pytest.raises(ValueError, match="Invalid budget value"):
        matched_density(shapes, 10**12)
    with pytest.raises(ValueError, match="Invalid match_memory value: 'lora:8'"):
        matched_memory("lora:8", "tiny")
    assert matched_memory(f"bytes:{8 * math.prod((64, 64))}", "tiny")["density"] > 0


def _mlp_step(optimizer_class, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    optimizer = optimizer_class(model.parameters(), **options)
    x = torch.randn(128, 64)

    def step() -> None:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, step


@pytest.mark.parametrize("optimizer_class,options", [(torch.optim.SGD, {"lr": 0.1}), (torch.optim.AdamW, {}),
                                                     (SPAM, {"foreach": False}), (SPAM, {"density": 0.25})])
def test_cpu_step_peak_equals_torchs_memory_tracker(optimizer_class, options):
    """The CPU peak of a steady-state training step (resident tensors + the profiler's allocation peak) equals
    the peak that torch's own MemTracker (a dispatch-mode tracker of every tensor, written by torch's
    developers) finds for the same step, to the byte."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    model, optimizer, step = _mlp_step(optimizer_class, **options)
    step()  # state exists from here on
    with step_peak_memory(model, optimizer, torch.device("cpu")) as peak:
        step()
    tracker = mem_tracker.MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    assert peak["bytes"] == tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert "profiler" in peak["method"]


def test_step_peak_counts_a_known_temporary_and_the_state():
    """A step that also holds a 4 MiB temporary peaks 4 MiB higher; AdamW's steady step holds its two moments
    beyond SGD's (resident before the step: parameters plus state, counted by hand)."""
    model, optimizer, step = _mlp_step(torch.optim.AdamW)
    step()
    params = sum(p.numel() * 4 for p in model.parameters())
    assert resident_bytes(model, optimizer) == 3 * params + 4 * 4  # weights, m, v, a step count per tensor
    with step_peak_memory(model, optimizer, torch.device("cpu")) as plain:
        step()
    with step_peak_memory(model, optimizer, torch.device("cpu")) as bigger:
        keep = torch.ones(2**20)  # 4 MiB alive through the step
        step()
        del keep
    assert bigger["bytes"] - plain["bytes"] == 4 * 2**20
    sgd_model, sgd, sgd_step = _mlp_step(torch.optim.SGD, lr=0.1)
    sgd_step()
    with step_peak_memory(sgd_model, sgd, torch.device("cpu")) as sgd_peak:
        sgd_step()
    assert plain["bytes"] - sgd_peak["bytes"] >= 2 * params


def test_step_peak_steps_aside_under_a_users_profiler():
    """Profilers do not nest: inside a user's profiler the measurement is skipped, not an error."""
    model, optimizer, step = _mlp_step(torch.optim.SGD, lr=0.1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        with step_peak_memory(model, optimizer, torch.device("cpu")) as peak:
            step()
    assert peak == {}
