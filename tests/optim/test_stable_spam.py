"""StableSPAM against a float64 transcription of its specification (default and ``reference_compat``), and the
conventions SPAM is held to: p.grad untouched, tensor state that reloads and resumes bit-exactly (torch.load
and DCP) across a reset, non-finite skips read nothing on the host, GradScaler, closures, maximize, tensor lr,
schedulers, bf16 parameters with fp32 state, named errors, foreach ≡ for-loop. And AdaClipGN around torch's
AdamW, checked against StableSPAM without MoRet."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from spamopt import AdaClipGN, StableSPAM
from spamopt.optim.compiled import compiled_available
from spamopt.optim.stable_spam import PRESETS

from .probes import HostReads
from .stable_reference import ReferenceStableSPAM
from .streams import set_grads, spiky_gradients

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, gamma1=0.7, gamma2=0.9, gamma3=0.99,
             reset_interval=7)
SHAPES = [(12, 9), (17,), ()]


IMPLEMENTATIONS = [
    pytest.param({"foreach": False}, id="forloop"), pytest.param({"foreach": True}, id="foreach"),
    pytest.param({"compiled": True}, id="compiled", marks=pytest.mark.skipif(
        not compiled_available("cpu"), reason="torch.compile needs a C++ compiler"))]


def _run_against_oracle(steps, implementation, **options):
    stream = spiky_gradients(SHAPES, steps, seed=4, spike_rate=0.05)
    rng = np.random.default_rng(5)
    init = [rng.standard_normal(s) for s in SHAPES]
    params = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    opt = StableSPAM(params, **implementation, **{**HYPER, **options})
    oracle = ReferenceStableSPAM(init, **{**HYPER, **options})
    for step, grads in enumerate(stream, start=1):
        grads = list(grads)
        if step <= 3 or step == 11:
            grads[1] = None  # the vector joins at step 4 and misses step 11
        set_grads(params, grads)
        opt.step()
        oracle.step(grads)
        for p, ref in zip(params, oracle.params):
            np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-10, atol=1e-13, err_msg=f"step {step}")
    return opt, oracle, params


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("options", [{}, {"adaclip": "clamp"}, {"total_steps": 20, "eta_min": 0.3},
                                     {"gamma1": -1, "reset_interval": 0}, {"adaclip": "off"}, {"adagn": False}],
                         ids=["default", "clamp", "sigma_schedule_clamped", "gamma1_is_beta1_no_moret",
                              "ablation_no_adaclip", "ablation_no_adagn"])
def test_default_step_matches_the_float64_oracle(implementation, options):
    """30 steps with 50x-1000x spikes, a parameter that joins late and misses a step, resets every 7 steps,
    weight decay, the σ schedule past its end (clamped): parameters, moments and statistics of every
    implementation (the compiled one included) equal the spec's float64 transcription; AdaClip fired."""
    opt, oracle, params = _run_against_oracle(30, implementation, **options)
    assert oracle.clipped > 0 or options.get("adaclip") == "off"
    for i, p in enumerate(params):
        state = opt.state[p]
        np.testing.assert_allclose(state["exp_avg"].numpy(), oracle.m[i], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(float(state["max_ema"]), oracle.M[i], rtol=1e-12)
        np.testing.assert_allclose(float(state["norm_ema"]), oracle.a[i], rtol=1e-12)
        assert int(state["stat_step"]) == oracle.n[i] and int(state["step"]) == oracle.k[i]


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_reference_compat_matches_the_oracle_over_thousands_of_steps(foreach):
    """``reference_compat``: one counter, the late reset and the unclamped σ (total_steps 700 < 2000 steps),
    over 2000 float64 steps with a reset every 250: equal to the oracle of the released code's behaviour."""
    opt, oracle, params = _run_against_oracle(2000, {"foreach": foreach}, reference_compat=True, reset_interval=250,
                                              total_steps=700)
    assert "stat_step" not in opt.state[params[0]]
    assert int(opt.state[params[0]]["step"]) == oracle.k[0] == 1  # τ = 2000 is a reset step: c restarts at 1


def test_reference_compat_differs_where_the_spec_says():
    """After a reset the compat counter restarts at 1, so AdaClip's bound is inflated (M / (1 − γ3^2)) and a
    spike the default mode clips passes; before the first reset the two modes are identical."""
    def run(compat):
        p = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
        # one implementation for both (compat has no compiled one), so only the mode differs
        opt = StableSPAM([p], lr=1e-3, gamma3=0.999, reset_interval=10, reference_compat=compat, compiled=False)
        seen = []
        for step in range(1, 13):
            p.grad = torch.full((8,), 0.1, dtype=torch.float64)
            if step == 12:
                p.grad[0] = 100.0
            opt.step()
            seen.append(p.detach().clone())
        return seen
    default, compat = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(default[:9], compat[:9]))
    assert not torch.equal(default[11], compat[11])


def test_p_grad_is_never_modified_and_foreach_equals_forloop_in_float32():
    stream = spiky_gradients(SHAPES, 25, seed=1, spike_rate=0.05, dtype=np.float32)
    results = []
    for foreach in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        opt = StableSPAM(params, **HYPER, foreach=foreach, maximize=True)
        for grads in stream:
            set_grads(params, grads)
            given = [p.grad.clone() for p in params]
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(params, given))
        results.append((params, opt))
    (a, opt_a), (b, opt_b) = results
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
        for key, value in opt_a.state[pa].items():
            torch.testing.assert_close(opt_b.state[pb][key], value, rtol=1e-5, atol=1e-9)


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(dtype)


def _train(model, opt, steps, seed=0, scaler=None, nonfinite_at=None):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for step in range(1, steps + 1):
        x = torch.randn(32, 10, generator=gen).to(dtype)
        opt.zero_grad(set_to_none=True)
        loss = model(x).float().pow(2).mean()
        (loss if scaler is None else scaler.scale(loss)).backward()
        if step == nonfinite_at:
            model[0].weight.grad[0, 0] = float("nan")
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return loss.item()


def test_state_reloads_weights_only_and_resumes_bit_exactly_across_a_reset():
    """Saved after step 6 (reset every 4: the resumed part crosses the reset at 8), reloaded with
    ``torch.load(weights_only=True)`` into a fresh optimizer: the rest of the run is bit-identical, and every
    state entry keeps its dtype (the int64 clock, float64 statistics, fp32 moments of bf16 parameters)."""
    for dtype in (torch.float32, torch.bfloat16):
        model, twin = _model(dtype=dtype), _model(dtype=dtype)
        opt = StableSPAM(model.parameters(), reset_interval=4, lr=1e-2)
        _train(model, opt, 6)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        twin.load_state_dict(model.state_dict())
        twin_opt = StableSPAM(twin.parameters(), reset_interval=4, lr=1e-2)
        twin_opt.load_state_dict(torch.load(buffer, weights_only=True))
        _train(model, opt, 6, seed=3)
        _train(twin, twin_opt, 6, seed=3)
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
            for key, value in opt.state[a].items():
                assert torch.equal(twin_opt.state[b][key], value) and twin_opt.state[b][key].dtype == value.dtype
        state = opt.state[next(model.parameters())]
        assert state["global_step"].dtype == torch.int64 and state["max_ema"].dtype == torch.float64
        assert state["exp_avg"].dtype == torch.float32


def test_distributed_checkpoint_round_trip(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = _model()
    opt = StableSPAM(model.parameters(), reset_interval=4)
    _train(model, opt, 5)
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / "ckpt"))
    resumed = copy.deepcopy(model)
    resumed_opt = StableSPAM(resumed.parameters(), reset_interval=4)
    template = {"optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"))
    set_optimizer_state_dict(resumed, resumed_opt, template["optim"])
    _train(model, opt, 5, seed=1)
    _train(resumed, resumed_opt, 5, seed=1)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_a_nonfinite_step_changes_nothing_and_reads_nothing_on_the_host(foreach):
    model = _model()
    opt = StableSPAM(model.parameters(), foreach=foreach)
    _train(model, opt, 3)
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad = torch.full_like(model[0].weight, float("inf"))
    clocks = [s["global_step"] for s in opt.state.values()]
    with HostReads(allowed=clocks) as probe:
        opt.step()
    assert probe.seen == []
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    for key, value in before.items():
        expected = value + 1 if key in ("global_step", "skipped_steps") else value
        assert torch.equal(opt.state[model[0].weight][key], expected), key


def test_grad_scaler_run_equals_the_unscaled_run():
    """Scaled by 2^10 (exact), unscaled inside the step, the overflow step skipped by the scaler's flag in one
    run and by the optimizer's own check in the other: bit-identical."""
    plain, scaled = _model(), _model()
    plain_opt, scaled_opt = StableSPAM(plain.parameters()), StableSPAM(scaled.parameters())
    _train(plain, plain_opt, 8, nonfinite_at=4)
    _train(scaled, scaled_opt, 8, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10), nonfinite_at=4)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)
    assert all(int(s["skipped_steps"]) == 1 for s in scaled_opt.state.values())


def test_closure_maximize_tensor_lr_and_a_scheduler():
    """The closure's loss is returned; a tensor lr equals a float lr; maximize climbs; a scheduler reaches it."""
    losses = {}
    for name, lr in (("float", 1e-2), ("tensor", torch.tensor(1e-2, dtype=torch.float64))):
        model = _model(dtype=torch.float64)
        opt = StableSPAM(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        x = torch.randn(32, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

        def closure():
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss

        first = closure().item()
        for _ in range(20):
            returned = opt.step(closure)
            scheduler.step()
        losses[name] = (first, returned.item(), [p.detach().clone() for p in model.parameters()])
    assert losses["float"][1] < 0.5 * losses["float"][0]
    assert all(torch.equal(a, b) for a, b in zip(losses["float"][2], losses["tensor"][2]))
    model = _model(dtype=torch.float64)
    opt = StableSPAM(model.parameters(), lr=1e-2, maximize=True)
    x = torch.randn(32, 10, dtype=torch.float64)
    start = model(x).pow(2).mean().item()
    for _ in range(10):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert model(x).pow(2).mean().item() > start


def test_presets_and_bad_arguments():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = StableSPAM.from_preset("bf16", params, lr=5e-4)
    assert opt.defaults["gamma2"] == PRESETS["bf16"]["gamma2"] == 0.99999 and opt.defaults["lr"] == 5e-4
    cases = [({"gamma2": 1.0}, "gamma2"), ({"gamma1": 1.5}, "gamma1"), ({"adaclip": "cut"}, "adaclip"),
             ({"reset_interval": -1}, "reset_interval"), ({"total_steps": 0}, "total_steps"),
             ({"eta_min": 2.0}, "eta_min"), ({"fused": True}, "fused"), ({"lr": -1.0}, "learning rate")]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            StableSPAM(params, **kwargs)
    with pytest.raises(ValueError, match="Invalid preset value: 'fp8'"):
        StableSPAM.from_preset("fp8", params)


# ------------------------------------------------------------------------------------------ AdaClipGN


def _wrapped_and_stable(weight_decay=0.1):
    a, b = _model(dtype=torch.float64), _model(dtype=torch.float64)
    wrapped = AdaClipGN(torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=weight_decay, eps=1e-8),
                        gamma1=0.7, gamma2=0.9, gamma3=0.99)
    stable = StableSPAM(b.parameters(), lr=1e-2, weight_decay=weight_decay, gamma1=0.7, gamma2=0.9, gamma3=0.99,
                        reset_interval=0)
    return (a, wrapped), (b, stable)


def test_adaclipgn_around_adamw_equals_stable_spam_without_moret():
    """AdaClipGN(torch's AdamW) hands AdamW the transformed gradient: the run equals StableSPAM with MoRet off
    (whose Adam is AdamW's, weight decay first), and the user's p.grad is the same tensor, unchanged."""
    (a, wrapped), (b, stable) = _wrapped_and_stable()
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 16):
        x = torch.randn(32, 10, generator=gen, dtype=torch.float64) * (30.0 if step == 9 else 1.0)
        for model, opt in ((a, wrapped), (b, stable)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
        grads = [p.grad for p in a.parameters()]
        copies = [g.clone() for g in grads]
        wrapped.step()
        stable.step()
        assert all(p.grad is g and torch.equal(g, c) for p, g, c in zip(a.parameters(), grads, copies))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_adaclipgn_state_round_trips_with_the_inner_optimizer_and_schedulers_reach_it():
    (a, wrapped), _ = _wrapped_and_stable()
    scheduler = torch.optim.lr_scheduler.StepLR(wrapped, step_size=2, gamma=0.5)
    _train(a, wrapped, 4)
    scheduler.step()
    assert wrapped.optimizer.param_groups[0]["lr"] == wrapped.param_groups[0]["lr"]
    saved = wrapped.state_dict()
    assert {"exp_avg", "adaclipgn.max_ema", "adaclipgn.stat_step"} <= set(saved["state"][0])
    twin = copy.deepcopy(a)
    twin_opt = AdaClipGN(torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1), gamma1=0.7,
                         gamma2=0.9, gamma3=0.99)
    twin_opt.load_state_dict(torch.load(_saved(saved), weights_only=True))
    _train(a, wrapped, 4, seed=7)
    _train(twin, twin_opt, 4, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), twin.parameters()))


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("big", [1e20, 1e30, "max"])
def test_one_huge_finite_coordinate_leaves_finite_weights_and_statistics(implementation, dtype, big):
    """A finite gradient coordinate of 1e20, 1e30 or the dtype's largest value used to overflow AdaGN's
    squared norm (NaN weights and inf statistics for good). Now every implementation keeps the weights and
    statistics finite, the update stays the size of the learning rate, and later ordinary steps train on."""
    big = torch.finfo(dtype).max if big == "max" else big
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    opt = StableSPAM([p], lr=1e-3, **implementation)
    p.grad = torch.tensor([big, 1.0, 1.0, 1.0]).to(dtype)
    assert torch.isfinite(p.grad).all()
    opt.step()
    for _ in range(5):
        p.grad = torch.ones(4, dtype=dtype)
        opt.step()
    assert torch.isfinite(p).all() and p.abs().max() < 0.05, p
    assert all(torch.isfinite(opt.state[p][key]) for key in ("max_ema", "norm_ema", "norm_sq_ema"))
    assert (p[1:] < 0).all()  # the ordinary coordinates still move against their gradient


@pytest.mark.parametrize("big", [1e20, 1e30, torch.finfo(torch.float32).max])
def test_adaclipgn_survives_a_huge_finite_coordinate(big):
    """The same for AdaClip + AdaGN in front of torch's AdamW."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdaClipGN(torch.optim.AdamW([p], lr=1e-3))
    for grad in ([big, 1.0, 1.0, 1.0], [1.0] * 4, [1.0] * 4):
        p.grad = torch.tensor(grad)
        opt.step()
    assert torch.isfinite(p).all() and p.abs().max() < 0.01
    assert all(torch.isfinite(opt.state[p]["adaclipgn." + key]) for key in ("max_ema", "norm_ema", "norm_sq_ema"))


def test_the_overflow_proof_norm_equals_torchs_wherever_that_one_is_finite():
    """``safe_norm`` scales by a power of two, so it changes no result that neither overflowed nor underflowed:
    bit-identical to ``torch.linalg.vector_norm`` on ordinary and mixed-magnitude tensors; right (to float64's
    norm) where torch's squares underflow to 0 or overflow to inf."""
    from spamopt.optim.stabilize import safe_norm

    torch.manual_seed(0)
    for g in (torch.randn(1000), torch.randn(1000) * 1e-15, torch.randn(300) * torch.logspace(-20, 15, 300),
              torch.zeros(5), torch.randn(7).bfloat16().float()):
        assert safe_norm(g).item() == torch.linalg.vector_norm(g).double().item()
    for g in (torch.randn(1000) * 1e-30, torch.full((9,), torch.finfo(torch.float32).max)):
        assert not 0 < torch.linalg.vector_norm(g).item() < float("inf")
        assert safe_norm(g).item() == pytest.approx(torch.linalg.vector_norm(g.double()).item(), rel=1e-6)


def _wrapped_adamw(seed: int = 0) -> tuple[list[torch.nn.Parameter], AdaClipGN]:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    return params, AdaClipGN(torch.optim.AdamW(params, lr=1e-2))


def _wrapped_steps(params, optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_adaclipgn_copies_and_pickles_as_one_optimizer(how):
    """A deep copy or a pickle round trip keeps the wrapped optimizer and the settings (they used to be lost,
    and the copy's step() raised AttributeError); the copy then steps exactly as the original."""
    import pickle

    params, optimizer = _wrapped_adamw()
    _wrapped_steps(params, optimizer, 3)
    if how == "deepcopy":
        copy_params, copied = copy.deepcopy((params, optimizer))
    else:
        copy_params, copied = pickle.loads(pickle.dumps((params, optimizer)))
    assert copied.settings == optimizer.settings and copied.param_groups is copied.optimizer.param_groups
    _wrapped_steps(params, optimizer, 3, seed=2)
    _wrapped_steps(copy_params, copied, 3, seed=2)
    for a, b in zip(params, copy_params):
        assert torch.equal(a, b)


def test_adaclipgn_runs_every_hook_once():
    """State-dict and load-state-dict hooks registered on the wrapper run (they never did); a global step hook
    runs once per step (it ran twice: for the wrapper and for the wrapped optimizer), the wrapper's own step
    hooks once, and hooks registered on the wrapped optimizer still run."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    params, optimizer = _wrapped_adamw()
    calls: list[str] = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("state_dict pre"))
    optimizer.register_state_dict_post_hook(lambda opt, sd: calls.append("state_dict post"))
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load post"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("wrapper step"))
    optimizer.optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("inner step"))
    handle = register_optimizer_step_post_hook(lambda opt, a, k: calls.append("global"))
    try:
        _wrapped_steps(params, optimizer, 1)
    finally:
        handle.remove()
    optimizer.load_state_dict(optimizer.state_dict())
    assert sorted(calls) == sorted(["inner step", "global", "wrapper step", "state_dict pre", "state_dict post",
                                    "load pre", "load post"])


def test_adaclipgn_refuses_sparse_gradients_and_a_gamma1_without_betas_clearly():
    params, optimizer = _wrapped_adamw()
    params[0].grad = torch.eye(5, 3).to_sparse()
    with pytest.raises(RuntimeError, match="AdaClipGN does not support sparse gradients"):
        optimizer.step()
    with pytest.raises(ValueError, match="Invalid gamma1 value: -1 .*SGD has no betas"):
        AdaClipGN(torch.optim.SGD(params, lr=0.1), gamma1=-1)
