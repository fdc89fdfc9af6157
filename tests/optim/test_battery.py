"""The three optimizers (SPAM, StableSPAM, AdaClipGN around AdamW) described the way torch describes its own:
an ``OptimizerInfo`` each (``torch.testing._internal.common_optimizers``), with sample configurations and
error inputs, and tests parametrised over them. A new option gets covered by adding a sample here.

What the battery proves, for every sample configuration: a few steps keep every parameter finite and leave
``p.grad`` untouched; a state dict saved with ``torch.save`` and reloaded with ``weights_only=True`` continues
bit for bit; and for every error input, the named error at construction or at the first step. Beside it:
the step count's dtype follows torch's default dtype as AdamW's does, and ``load_state_dict`` refuses another
optimizer's or a damaged state while keeping the state it had.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

from spamopt import SPAM, AdaClipGN, StableSPAM

common = pytest.importorskip("torch.testing._internal.common_optimizers", reason="needs expecttest (test extra)")
# Importing torch's test utilities freezes torch.backends' global flags for the rest of the process (torch's own
# suite sets them only through context managers); Lightning sets them directly, so thaw them for later tests.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
ErrorOptimizerInput, OptimizerErrorEnum = common.ErrorOptimizerInput, common.OptimizerErrorEnum
OptimizerInfo, OptimizerInput = common.OptimizerInfo, common.OptimizerInput

CONSTRUCTION, STEP = OptimizerErrorEnum.CONSTRUCTION_ERROR, OptimizerErrorEnum.STEP_ERROR
# Short reset periods with SPAM's default 150-step warmup warn (on purpose, for users); not what is tested here.
pytestmark = pytest.mark.filterwarnings("ignore:warmup_steps=")


def adaclipgn_adamw(params: Any, lr: float | torch.Tensor = 1e-3, **wrapper: Any) -> AdaClipGN:
    """AdaClipGN around torch's AdamW, constructed from parameters as OptimizerInfo expects."""
    return AdaClipGN(torch.optim.AdamW(params, lr=lr), **wrapper)


def _params() -> list[torch.nn.Parameter]:
    """A 64×64 matrix (one full stratum of sparse momentum), a vector and a 0-dim parameter."""
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((64, 64), (17,), ())]


def _shared_inputs() -> list[OptimizerInput]:
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.02}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.001)}, desc="0-dim tensor lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor([0.001])}, desc="tensor lr of shape [1]"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor([[0.001]])}, desc="tensor lr of shape [1, 1]"),
    ]


def _optimizer_inputs(device: str, dtype: torch.dtype) -> list[OptimizerInput]:
    options = [({"weight_decay": 0.1}, "weight decay"), ({"maximize": True}, "maximize"),
               ({"betas": (0.8, 0.95), "eps": 1e-8}, "betas and eps"), ({"foreach": True}, "foreach"),
               ({"compiled": True}, "compiled"), ({"skip_nonfinite": False}, "non-finite as zero"),
               ({"reference_compat": True}, "reference_compat"), ({"reset_interval": 2}, "frequent resets")]
    return _shared_inputs() + [OptimizerInput(params=None, kwargs=k, desc=d) for k, d in options]


def _spam_inputs(device: str, dtype: torch.dtype) -> list[OptimizerInput]:
    options = [({"density": 0.25, "reset_interval": 2}, "sparse momentum with redraws"),
               ({"threshold": 2.0, "clip_delay": 0, "warmup_steps": 1, "reset_interval": 3}, "clipping, warmup"),
               ({"bias_correction_reset": True, "reset_interval": 2}, "bias_correction_reset")]
    return _optimizer_inputs(device, dtype) + [OptimizerInput(params=None, kwargs=k, desc=d) for k, d in options]


def _stable_inputs(device: str, dtype: torch.dtype) -> list[OptimizerInput]:
    options = [({"adaclip": "clamp"}, "AdaClip clamp"), ({"adaclip": "off", "adagn": False}, "Adam + MoRet"),
               ({"gamma1": -1}, "gamma1 is beta1"), ({"total_steps": 5, "eta_min": 0.5}, "momentum schedule")]
    return _optimizer_inputs(device, dtype) + [OptimizerInput(params=None, kwargs=k, desc=d) for k, d in options]


def _wrapper_inputs(device: str, dtype: torch.dtype) -> list[OptimizerInput]:
    options = [({"adaclip": "clamp"}, "AdaClip clamp"), ({"gamma1": -1}, "gamma1 is beta1"),
               ({"skip_nonfinite": False}, "non-finite as zero")]
    return _shared_inputs() + [OptimizerInput(params=None, kwargs=k, desc=d) for k, d in options]


def _shared_errors() -> list[ErrorOptimizerInput]:
    bad = [({"lr": -1.0}, "Invalid learning rate: -1.0"), ({"lr": float("inf")}, "Invalid learning rate: inf"),
           ({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
           ({"betas": (1.0, 0.9)}, "Invalid beta parameter at index 0"), ({"eps": -1e-8}, "Invalid epsilon value"),
           ({"weight_decay": -0.1}, "Invalid weight_decay value"),
           ({"skip_nonfinite": "no"}, "Invalid skip_nonfinite value: 'no'")]
    return [ErrorOptimizerInput(OptimizerInput(params=None, kwargs=k, desc=m), error_type=ValueError,
                                error_regex=m) for k, m in bad]


def _integer_parameter_error(name: str) -> ErrorOptimizerInput:
    return ErrorOptimizerInput(
        OptimizerInput(params=[torch.nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)],
                       kwargs={}, desc="int64 parameter"),
        error_type=ValueError, error_regex=f"Invalid parameter dtype: torch.int64 .*{name} steps floating-point")


def _spam_errors(device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    bad = [({"density": 0.0}, r"Invalid density value: 0.0 \(must be in \(0, 1\]\)"),
           ({"density": 1e-4}, "Invalid density value: 0.0001 .*keeps no coordinate of a 64x64 matrix"),
           ({"reset_interval": -3}, "Invalid reset_interval value: -3"), ({"threshold": -1.0}, "Invalid threshold")]
    return _shared_errors() + [_integer_parameter_error("SPAM")] + [
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs=k, desc=m), error_type=ValueError, error_regex=m)
        for k, m in bad]


def _stable_errors(device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    bad = [({"gamma2": 1.0}, "Invalid gamma2 value"), ({"adaclip": "sometimes"}, "Invalid adaclip value")]
    return _shared_errors() + [_integer_parameter_error("StableSPAM")] + [
        ErrorOptimizerInput(OptimizerInput(params=None, kwargs=k, desc=m), error_type=ValueError, error_regex=m)
        for k, m in bad]


def _wrapper_errors(device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    bad = [({"skip_nonfinite": "no"}, "Invalid skip_nonfinite value: 'no'"), ({"gamma3": -0.5}, "Invalid gamma3"),
           ({"adaclip": "sometimes"}, "Invalid adaclip value")]
    return [ErrorOptimizerInput(OptimizerInput(params=None, kwargs=k, desc=m), error_type=ValueError, error_regex=m)
            for k, m in bad]


INFOS = [
    OptimizerInfo(SPAM, optim_inputs_func=_spam_inputs, optim_error_inputs_func=_spam_errors,
                  supported_impls=("foreach", "fused", "compiled")),
    OptimizerInfo(StableSPAM, optim_inputs_func=_stable_inputs, optim_error_inputs_func=_stable_errors,
                  supported_impls=("foreach", "compiled")),
    OptimizerInfo(adaclipgn_adamw, optim_inputs_func=_wrapper_inputs, optim_error_inputs_func=_wrapper_errors,
                  supported_impls=()),
]


def _name(info: OptimizerInfo) -> str:
    return getattr(info.optim_cls, "__name__", str(info.optim_cls))


def _samples(kind: str) -> list[Any]:
    cases = []
    for info in INFOS:
        make = info.optim_inputs_func if kind == "inputs" else info.optim_error_inputs_func
        for sample in make("cpu", torch.float32):
            desc = sample.desc if kind == "inputs" else sample.optimizer_error_input.desc
            cases.append(pytest.param(info, sample, id=f"{_name(info)}-{desc}"))
    return cases


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator) * (50.0 if step == 2 else 1.0) for p in params]


def _train(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        originals = [p.grad.clone() for p in params]
        optimizer.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, originals)), "p.grad was modified"


def _skip_unavailable(kwargs: dict[str, Any]) -> None:
    if kwargs.get("compiled"):
        from spamopt.optim.compiled import compiled_available

        if not compiled_available("cpu"):
            pytest.skip("torch.compile needs a C++ compiler")


@pytest.mark.parametrize("info,sample", _samples("inputs"))
def test_every_sample_steps_finitely_and_resumes_bit_exactly(info, sample):
    """Five steps (a 50x gradient at the third), a weights_only save and reload into a fresh optimizer, then
    three more steps on both: parameters and state equal bit for bit, all finite, p.grad never modified."""
    _skip_unavailable(sample.kwargs)
    params, twins = _params(), _params()
    optimizer = info.optim_cls(params, **copy.deepcopy(sample.kwargs))
    _train(optimizer, params, range(5))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    with torch.no_grad():
        for twin, p in zip(twins, params):
            twin.copy_(p)
    twin_optimizer = info.optim_cls(twins, **copy.deepcopy(sample.kwargs))
    twin_optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    _train(optimizer, params, range(5, 8))
    _train(twin_optimizer, twins, range(5, 8))
    for p, twin in zip(params, twins):
        assert torch.isfinite(p).all() and torch.equal(p, twin)
        for key, value in optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(twin_optimizer.state[twin][key]), torch.as_tensor(value)), key


@pytest.mark.parametrize("info,error", _samples("errors"))
def test_every_error_input_raises_its_named_error(info, error):
    sample = error.optimizer_error_input
    params = sample.params if sample.params is not None else _params()
    if error.error_on == CONSTRUCTION:
        with pytest.raises(error.error_type, match=error.error_regex):
            info.optim_cls(params, **sample.kwargs)
        return
    optimizer = info.optim_cls(params, **sample.kwargs)
    with pytest.raises(error.error_type, match=error.error_regex):
        optimizer.step()


@pytest.mark.parametrize("info", INFOS, ids=_name)
def test_the_step_count_follows_the_default_dtype_as_adamws_does(info):
    """torch's AdamW keeps ``step`` in float64 when that is the default dtype (float32 otherwise)."""
    previous = torch.get_default_dtype()
    try:
        for default in (torch.float64, torch.float32):
            torch.set_default_dtype(default)
            ours, reference = _params(), _params()
            optimizer = info.optim_cls(ours)
            adamw = torch.optim.AdamW(reference)
            _train(optimizer, ours, range(1))
            _train(adamw, reference, range(1))
            assert optimizer.state[ours[0]]["step"].dtype == adamw.state[reference[0]]["step"].dtype == default
    finally:
        torch.set_default_dtype(previous)


def _trained(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> tuple[Any, list[torch.Tensor]]:
    params = _params()
    optimizer = make(params)
    _train(optimizer, params, range(3))
    return optimizer, params


DAMAGE = {
    "lr -1": (lambda sd: sd["param_groups"][0].update(lr=-1.0), "Invalid learning rate: -1.0"),
    "density 0": (lambda sd: sd["param_groups"][0].update(density=0.0), "Invalid density value: 0.0"),
    "density edited": (lambda sd: sd["param_groups"][0].update(density=0.5), r"'exp_avg' has shape \(1024,\)"),
    "reset_interval -3": (lambda sd: sd["param_groups"][0].update(reset_interval=-3), "Invalid reset_interval"),
    "missing threshold": (lambda sd: sd["param_groups"][0].pop("threshold"), "has no threshold"),
    "missing exp_avg": (lambda sd: sd["state"][0].pop("exp_avg"), "parameter 0 has no 'exp_avg' state"),
    "missing mask_seed": (lambda sd: sd["state"][0].pop("mask_seed"), "parameter 0 has no 'mask_seed' state"),
    "integer moments": (lambda sd: sd["state"][1].update(exp_avg=sd["state"][1]["exp_avg"].long()),
                        "'exp_avg' is torch.int64 where torch.float32"),
    "float mask bits": (lambda sd: sd["state"][0].update(mask_bits=sd["state"][0]["mask_bits"].float()),
                        "'mask_bits' is torch.float32 where torch.uint8"),
    "other shape": (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(3)), r"shape \(3,\) where \(17,\)"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_state_is_refused_and_the_old_state_kept(damage):
    """Each of these used to load and then crash at a later step or mask redraw (or train with a setting the
    constructor refuses); now load_state_dict names the problem and the optimizer keeps its own state."""
    optimizer, params = _trained(lambda ps: SPAM(ps, density=0.25, reset_interval=4))
    before = copy.deepcopy(optimizer.state_dict())
    edit, message = DAMAGE[damage]
    damaged = copy.deepcopy(before)
    edit(damaged)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(damaged)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for pid, entries in before["state"].items():
        assert all(torch.equal(after["state"][pid][k], v) for k, v in entries.items())
    _train(optimizer, params, range(3, 6))  # still usable


@pytest.mark.parametrize("source", ["StableSPAM", "AdamW"])
def test_another_optimizers_state_is_refused(source):
    """A StableSPAM state dict used to load into SPAM (which then ran with its reset_interval and eps), and
    AdamW's restarted SPAM's clock; both are refused, naming what is missing. And SPAM's into StableSPAM."""
    makers = {"StableSPAM": lambda ps: StableSPAM(ps), "AdamW": lambda ps: torch.optim.AdamW(ps)}
    foreign, _ = _trained(makers[source])
    spam, _ = _trained(lambda ps: SPAM(ps))
    with pytest.raises(ValueError, match="has no .*threshold.*: it was not written by SPAM"):
        spam.load_state_dict(foreign.state_dict())
    stable, _ = _trained(lambda ps: StableSPAM(ps))
    with pytest.raises(ValueError, match="has no .*gamma1.*: it was not written by StableSPAM"):
        stable.load_state_dict(spam.state_dict())
