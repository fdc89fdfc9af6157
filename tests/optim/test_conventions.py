"""SPAM behaves like torch.optim.AdamW in every convention users rely on (the bar of torch's own
TestOptimRenewed / OptimizerInfo battery, adapted)."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

from spamopt import SPAM

from .streams import set_grads, spiky_gradients

SMALL = dict(lr=1e-2, reset_interval=10, warmup_steps=4, clip_delay=3, threshold=100.0)


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 48), torch.nn.LayerNorm(48), torch.nn.Linear(48, 8))
    model.register_parameter("scalar", torch.nn.Parameter(torch.tensor(0.5)))  # a 0-dim parameter
    return model.to(dtype)


def _groups(model, density=0.5, **overrides):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": matrices, "density": density, **overrides}, {"params": others}]


def _train(model, opt, steps, seed=0, frozen_after=None, empty_step=None):
    """Quadratic loss on random data; optionally freeze the first layer after a step and take one step
    with every gradient None."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for step in range(1, steps + 1):
        x = torch.randn(16, 40, generator=gen, dtype=torch.float64).to(dtype)
        opt.zero_grad(set_to_none=True)
        if step != empty_step:
            loss = (model(x) ** 2).mean() + model.scalar ** 2
            loss.backward()
            if frozen_after is not None and step > frozen_after:
                model[0].weight.grad = None
                model[0].bias.grad = None
        opt.step()


def _assert_same_state(a: SPAM, b: SPAM, exact=True):
    assert len(a.state) == len(b.state)
    for pa, pb in zip([p for g in a.param_groups for p in g["params"]],
                      [p for g in b.param_groups for p in g["params"]]):
        sa, sb = a.state[pa], b.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and sa[key].device == sb[key].device, key
            if exact:
                assert torch.equal(sa[key], sb[key]), key
            else:
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-13, atol=1e-15, msg=key)


CONFIGS = [
    dict(),
    dict(weight_decay=0.1, maximize=True),
    dict(bias_correction_reset=True, betas=(0.5, 0.9)),
    dict(lr=torch.tensor(1e-2)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "wd_maximize", "bc_reset", "tensor_lr"])
def test_foreach_matches_forloop_params_and_every_state_entry(config):
    """float64; dense and sparse groups; a 0-dim parameter; one layer frozen mid-run; one step with all
    gradients None; 25 steps across two resets."""
    models, opts = [], []
    for foreach in (False, True):
        model = _model()
        opt = SPAM(_groups(model), foreach=foreach, **{**SMALL, **config})
        _train(model, opt, 25, frozen_after=14, empty_step=7)
        models.append(model)
        opts.append(opt)
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-13, atol=1e-15)
    _assert_same_state(opts[0], opts[1], exact=False)


def test_state_holds_only_tensors_under_string_keys():
    model = _model()
    opt = SPAM(_groups(model), **SMALL)
    _train(model, opt, 3)
    assert opt.state, "state must not be empty after a step"
    assert all(isinstance(p, torch.Tensor) for p in opt.state)
    for state in opt.state.values():
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


def test_state_dict_is_deterministic_and_continues_identically():
    model = _model()
    opt = SPAM(_groups(model), **SMALL)
    _train(model, opt, 6)
    first, second = opt.state_dict(), opt.state_dict()
    assert first["param_groups"] == second["param_groups"]
    for pid in first["state"]:
        for key in first["state"][pid]:
            assert torch.equal(first["state"][pid][key], second["state"][pid][key])
    twin = copy.deepcopy(model)
    twin_opt = SPAM(_groups(twin), **SMALL)
    twin_opt.load_state_dict(copy.deepcopy(first))
    _train(model, opt, 8, seed=5)
    _train(twin, twin_opt, 8, seed=5)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    _assert_same_state(opt, twin_opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_only_reload_keeps_every_dtype(dtype):
    """torch.load(weights_only=True) works, and loading does not cast the int64 clock, the seed or the uint8
    bitmask to the parameter dtype (the base class would)."""
    model = _model(dtype)
    opt = SPAM(_groups(model), **SMALL)
    _train(model, opt, 4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = SPAM(_groups(model), **SMALL)
    fresh.load_state_dict(loaded)
    _assert_same_state(opt, fresh)
    weight_state = fresh.state[model[0].weight]
    assert weight_state["global_step"].dtype == torch.int64 and weight_state["mask_bits"].dtype == torch.uint8


def test_load_state_dict_from_older_version_and_with_python_number_step():
    """Implementation flags missing (an older version's state dict) fall back to the optimizer's own; a
    Python-number step becomes a tensor. A missing setting that changes the math is refused."""
    model = _model()
    opt = SPAM(_groups(model), **SMALL)
    _train(model, opt, 3)
    state_dict = copy.deepcopy(opt.state_dict())
    for group in state_dict["param_groups"]:
        for flag in ("foreach", "fused", "compiled", "capturable", "differentiable"):
            group.pop(flag, None)
    for state in state_dict["state"].values():
        state["step"] = float(state["step"])
    fresh = SPAM(_groups(model), **SMALL)
    fresh.load_state_dict(state_dict)
    assert all(g["foreach"] is None and g["capturable"] is False for g in fresh.param_groups)
    assert all(isinstance(s["step"], torch.Tensor) for s in fresh.state.values())
    _train(model, fresh, 2)
    del state_dict["param_groups"][0]["bias_correction_reset"]
    with pytest.raises(ValueError, match="parameter group 0 has no bias_correction_reset: it was not written by SPAM"):
        SPAM(_groups(model), **SMALL).load_state_dict(state_dict)


def _checkpoint_resume(stop_at, total, density, foreach):
    """Uninterrupted run vs. run killed after ``stop_at`` and resumed from a torch.save checkpoint."""
    reference = _model()
    ref_opt = SPAM(_groups(reference, density), foreach=foreach, **SMALL)
    _train(reference, ref_opt, stop_at)
    _train(reference, ref_opt, total - stop_at, seed=9)

    model = _model()
    opt = SPAM(_groups(model, density), foreach=foreach, **SMALL)
    _train(model, opt, stop_at)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    del model, opt
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = _model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = SPAM(_groups(resumed, density), foreach=foreach, **SMALL)
    resumed_opt.load_state_dict(checkpoint["optim"])
    _train(resumed, resumed_opt, total - stop_at, seed=9)
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    _assert_same_state(ref_opt, resumed_opt)


@pytest.mark.parametrize("stop_at", [6, 9, 10], ids=["mid_period", "before_redraw_reset", "after_reset"])
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_bit_exact_resume(stop_at, density):
    """Checkpoint mid-period, right after the step that redraws the masks, and right after a reset; the
    resumed run equals the uninterrupted one bit for bit through the next reset (step 20)."""
    _checkpoint_resume(stop_at, 23, density, foreach=stop_at == 9)


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_distributed_checkpoint_round_trip(tmp_path, density):
    """get/set_optimizer_state_dict + dcp.save/load (single process) resume bit-exactly."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    reference = _model()
    ref_opt = SPAM(_groups(reference, density), **SMALL)
    _train(reference, ref_opt, 12)

    model = _model()
    opt = SPAM(_groups(model, density), **SMALL)
    _train(model, opt, 7)
    dcp.save({"optim": get_optimizer_state_dict(model, opt), "model": model.state_dict()},
             checkpoint_id=str(tmp_path / "ckpt"))
    resumed = _model(seed=7)
    resumed_opt = SPAM(_groups(resumed, density), **SMALL)
    template = {"optim": get_optimizer_state_dict(resumed, resumed_opt), "model": resumed.state_dict()}
    dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"))
    resumed.load_state_dict(template["model"])
    set_optimizer_state_dict(resumed, resumed_opt, template["optim"])
    _train(resumed, resumed_opt, 5, seed=0)
    _train(model, opt, 5, seed=0)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    _assert_same_state(opt, resumed_opt)


def test_deepcopy_is_independent_and_identical():
    model = _model()
    opt = SPAM(_groups(model), **SMALL)
    _train(model, opt, 4)
    clone_model = copy.deepcopy(model)
    clone_opt = SPAM(_groups(clone_model), **SMALL)
    clone_opt.load_state_dict(copy.deepcopy(opt).state_dict())
    _train(model, opt, 3, seed=2)
    _train(clone_model, clone_opt, 3, seed=2)
    for a, b in zip(model.parameters(), clone_model.parameters()):
        assert torch.equal(a, b)
    copied = copy.deepcopy(opt)
    assert copied.defaults == opt.defaults
    first = next(iter(opt.state.values()))["exp_avg"]
    assert all(s["exp_avg"].data_ptr() != first.data_ptr() for s in copied.state.values())
    copied.step()  # a copy restores only defaults, state and groups: it must still step as made
    copied.record_statistics = True
    copied.step()
    assert copied.last_statistics is not None and opt.last_statistics is None


def test_optimizer_can_be_printed():
    text = repr(SPAM(_groups(_model()), **SMALL))
    assert text.startswith("SPAM (") and "reset_interval: 10" in text and "density: 0.5" in text


def test_group_with_tiny_lr_does_not_move():
    model = _model(torch.float32)
    frozen = [model[0].weight, model[0].bias]
    before = [p.detach().clone() for p in frozen]
    rest = [p for p in model.parameters() if all(p is not q for q in frozen)]
    opt = SPAM([{"params": frozen, "lr": 1e-28}, {"params": rest}], **{**SMALL, "lr": 1e-2})
    _train(model, opt, 12)
    for a, b in zip(frozen, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_gradients_are_never_modified(foreach, maximize):
    """Clipping active, sparse and dense groups, maximize on and off: p.grad keeps its values, storage and
    version counter."""
    params = [torch.nn.Parameter(torch.randn(32, 64)), torch.nn.Parameter(torch.randn(64))]
    opt = SPAM([{"params": params[:1], "density": 0.5}, {"params": params[1:]}], maximize=maximize,
               foreach=foreach, lr=1e-2, threshold=1.0, clip_delay=1, reset_interval=4, warmup_steps=2)
    for grads in spiky_gradients([(32, 64), (64,)], 9, seed=4, dtype="float32"):
        set_grads(params, grads)
        snapshot = [(p.grad.clone(), p.grad.data_ptr(), p.grad._version) for p in params]
        opt.step()
        for p, (values, pointer, version) in zip(params, snapshot):
            assert torch.equal(p.grad, values) and p.grad.data_ptr() == pointer and p.grad._version == version


@pytest.mark.parametrize("foreach", [False, True])
def test_nonfinite_gradients_skip_the_whole_step(foreach):
    params = [torch.nn.Parameter(torch.randn(16, 24)), torch.nn.Parameter(torch.randn(24))]
    opt = SPAM([{"params": params[:1], "density": 0.5}, {"params": params[1:]}], foreach=foreach, **SMALL)
    stream = spiky_gradients([(16, 24), (24,)], 5, seed=6, dtype="float32")
    for grads in stream[:3]:
        set_grads(params, grads)
        opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict()["state"])
    for bad in (float("nan"), float("inf"), -float("inf")):
        grads = [g.copy() for g in stream[3]]
        grads[1][5] = bad  # one coordinate of the *dense* vector poisons the whole step
        set_grads(params, grads)
        opt.step()
        for p, b in zip(params, before_params):
            assert torch.equal(p, b)
        for pid, state in opt.state_dict()["state"].items():
            for key, value in state.items():
                assert torch.isfinite(value.float()).all(), key
                if key not in ("global_step", "skipped_steps"):
                    assert torch.equal(value, before_state[pid][key]), key
    assert all(int(s["skipped_steps"]) == 3 for s in opt.state.values())
    assert all(int(s["global_step"]) == 6 for s in opt.state.values())
    set_grads(params, stream[4])
    opt.step()
    assert not torch.equal(params[1], before_params[1])


def test_the_nonfinite_check_finds_each_gradients_largest_magnitude():
    """``finite_peaks`` (the one read of every gradient behind ``skip_nonfinite``): its flag is False exactly when
    a value is NaN or ±Inf (huge finite values pass), and its per-tensor peaks are max|g| as a float64
    reference computes it, for float32, bfloat16, complex and 0-dim gradients; empty ones have none."""
    from spamopt.optim.base import finite_peaks

    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(7, 5, generator=gen), torch.randn(33, generator=gen).bfloat16(),
             torch.randn(4, 3, dtype=torch.complex64, generator=gen), torch.tensor(-2.5), torch.zeros(0, 4),
             torch.tensor([1.0, -3e38, 2.0])]
    flag, peaks = finite_peaks(grads)
    assert bool(flag) and peaks[4] is None
    for g, peak in zip(grads, peaks):
        if g.numel():
            real = torch.view_as_real(g) if g.is_complex() else g
            assert float(peak) == float(real.double().abs().max())
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = [g.clone() for g in grads]
        poisoned[1][17] = bad
        assert not bool(finite_peaks(poisoned)[0])
    assert finite_peaks(grads, with_peaks=False)[1] == [None] * len(grads)


def test_nonfinite_coordinates_count_as_zero_when_skipping_is_off():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = SPAM([p], skip_nonfinite=False, lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), float("inf"), -1.0])
    opt.step()
    assert torch.isfinite(p).all() and p[1] == 0 and p[2] == 0 and p[0] < 0 < p[3]
    assert all(torch.isfinite(v.float()).all() for v in opt.state[p].values())


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SPAM([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(3.0)
    assert (p < 1).all()


@pytest.mark.parametrize("foreach", [False, True])
def test_tensor_lr_matches_float_lr(foreach):
    results = []
    for lr in (3e-3, torch.tensor(3e-3, dtype=torch.float64)):
        model = _model()
        opt = SPAM(_groups(model), foreach=foreach, **{**SMALL, "lr": lr})
        _train(model, opt, 12)
        results.append([p.detach() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


SCHEDULERS = [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 10]),
    lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=7),
    lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5),
    lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=5),
    lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=25),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30),
    lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.001, 0.05, step_size_up=4, cycle_momentum=False),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1),
]


SCHEDULER_NAMES = ["StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts",
                   "LinearLR", "ConstantLR", "PolynomialLR", "LambdaLR", "OneCycleLR", "CyclicLR", "ReduceLROnPlateau"]


@pytest.mark.parametrize("make_scheduler", SCHEDULERS, ids=SCHEDULER_NAMES)
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_goes_right_direction_with_every_scheduler(make_scheduler, tensor_lr, maximize):
    """Minimising (or maximising the negation of) a convex quadratic from a non-contiguous parameter."""
    torch.manual_seed(0)
    target = torch.randn(10, 6)
    weight = torch.nn.Parameter(torch.randn(6, 10).t())  # non-contiguous
    lr = torch.tensor(0.05) if tensor_lr else 0.05
    opt = SPAM([weight], lr=lr, maximize=maximize, reset_interval=10, warmup_steps=3, clip_delay=2)
    scheduler = make_scheduler(opt)
    sign = -1.0 if maximize else 1.0

    def objective():
        return sign * ((weight - target) ** 2).sum()

    initial = ((weight - target) ** 2).sum().item()
    for _ in range(30):
        opt.zero_grad()
        loss = objective()
        loss.backward()
        opt.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(loss.item() * sign)
        else:
            scheduler.step()
    assert ((weight - target) ** 2).sum().item() < 0.8 * initial


@pytest.mark.parametrize("foreach", [False, True])
def test_complex_parameter_equals_its_real_view(foreach):
    torch.manual_seed(0)
    complex_param = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.complex128))
    real_param = torch.nn.Parameter(torch.view_as_real(complex_param.detach()).clone())
    opts = [SPAM([p], foreach=foreach, **SMALL) for p in (complex_param, real_param)]
    for step in range(25):
        grad = torch.randn(5, 4, dtype=torch.complex128) * (100.0 if step % 7 == 6 else 1.0)
        complex_param.grad, real_param.grad = grad, torch.view_as_real(grad).clone()
        for opt in opts:
            opt.step()
        torch.testing.assert_close(torch.view_as_real(complex_param), real_param, rtol=1e-14, atol=1e-15)


def test_sparse_complex_matrix_steps_finitely():
    p = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.complex64))
    opt = SPAM([p], density=0.5, **SMALL)
    for _ in range(12):
        p.grad = torch.randn_like(p)
        opt.step()
    assert torch.isfinite(torch.view_as_real(p)).all() and opt.state[p]["exp_avg"].numel() == 64


def test_step_is_noop_without_gradients_and_for_zero_gradients():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SPAM(_groups(model), **SMALL)
    opt.step()
    assert not opt.state
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(3):
        opt.step()
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)


def test_step_hooks_run():
    model = _model()
    opt = SPAM(_groups(model), **SMALL)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    _train(model, opt, 1)
    assert calls == ["pre", "post"]


def test_sparse_gradients_are_rejected():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = SPAM(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


BAD_INPUTS = [
    (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0 (must be in [0, 1))"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(betas=(0.9,)), "Invalid betas value"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(threshold=-1.0), "Invalid threshold value: -1.0 (must be a finite number >= 0; 0 disables"),
    (dict(threshold=float("inf")), "Invalid threshold value: inf"),
    (dict(reset_interval=2.5), "Invalid reset_interval value: 2.5 (must be an integer >= 0"),
    (dict(reset_interval=-1), "Invalid reset_interval value: -1"),
    (dict(reset_interval=True), "Invalid reset_interval value: True"),
    (dict(warmup_steps=1.0), "Invalid warmup_steps value: 1.0"),
    (dict(clip_delay=-5), "Invalid clip_delay value: -5"),
    (dict(density=0.0), "Invalid density value: 0.0 (must be in (0, 1])"),
    (dict(density=1.5), "Invalid density value: 1.5"),
    (dict(bias_correction_reset=1), "Invalid bias_correction_reset value: 1 (must be True or False)"),
    (dict(maximize="yes"), "Invalid maximize value"),
    (dict(foreach="yes"), "Invalid foreach value"),
    (dict(skip_nonfinite=None), "Invalid skip_nonfinite value"),
    (dict(keep_positions="yes"), "Invalid keep_positions value: 'yes' (must be True or False)"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS, ids=[next(iter(k)) for k, _ in BAD_INPUTS])
def test_bad_input_names_the_argument_and_the_range(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SPAM([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_bad_group_override_is_rejected_before_the_group_is_added():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = SPAM([p])
    with pytest.raises(ValueError, match=re.escape("Invalid density value: 2")):
        opt.add_param_group({"params": [q], "density": 2})
    assert len(opt.param_groups) == 1


def test_bf16_moments_on_request_track_torchs_adamw_in_bf16():
    """``fp32_moments=False``: the moments of bf16 parameters stay bf16, as torch's AdamW keeps them, and SPAM
    with its features off (and ε = 0, where the two ε placements agree) follows torch's bf16 AdamW to bf16
    rounding over 8 steps. The default keeps float32 moments (and ends elsewhere: the setting takes effect)."""
    torch.manual_seed(0)
    start = torch.randn(24, 16).to(torch.bfloat16)
    grads = [torch.randn(24, 16).to(torch.bfloat16) for _ in range(8)]
    off = dict(lr=1e-2, eps=0.0, threshold=0.0, reset_interval=0, warmup_steps=0, weight_decay=0.1)
    results = {}
    for name in ("spam-bf16", "spam-fp32", "adamw"):
        p = torch.nn.Parameter(start.clone())
        opt = (torch.optim.AdamW([p], lr=1e-2, eps=0.0, weight_decay=0.1, foreach=False) if name == "adamw"
               else SPAM([p], fp32_moments=name == "spam-fp32", **off))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results[name] = (p.detach().float(), opt.state[p]["exp_avg"].dtype)
    assert results["spam-bf16"][1] == results["adamw"][1] == torch.bfloat16
    assert results["spam-fp32"][1] == torch.float32
    torch.testing.assert_close(results["spam-bf16"][0], results["adamw"][0], rtol=2e-2, atol=2e-3)
    assert not torch.equal(results["spam-bf16"][0], results["spam-fp32"][0])


@pytest.mark.parametrize("setting, default", [("fp32_moments", True), ("keep_positions", False)])
def test_a_state_dict_from_before_a_later_setting_loads_with_the_default(setting, default):
    """State dicts written before ``fp32_moments`` or ``keep_positions`` existed lack it: they load, and the
    group takes the default (float32 moments; positions searched every step), instead of being refused as
    another optimizer's."""
    model = _model(dtype=torch.float32)
    opt = SPAM(_groups(model), **SMALL)
    _train(model, opt, 2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group[setting]
    fresh = SPAM(_groups(model), **SMALL)
    fresh.load_state_dict(saved)
    assert all(group[setting] is default for group in fresh.param_groups)
    _train(model, fresh, 1)
