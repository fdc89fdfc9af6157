"""The compiled step (``compiled=True``: one ``torch.compile`` loop per tensor) equals the for-loop reference
on the stress set of every implementation (fp32, bf16, fp16; dense and sparse; resets, clipping, warmup,
decay, a non-finite step, clip counts) and for each option; a long run across resets, warmup, clipping
switching on and off and an LR schedule compiles a bounded number of kernels; it is the CPU default only for
large groups, and refuses clearly where it cannot run."""

from __future__ import annotations

import pytest
import torch

from spamopt import SPAM
from spamopt.optim import compiled

from .streams import set_grads, spiky_gradients
from .stress import HYPER, assert_agrees_with_reference, run_steps

pytestmark = pytest.mark.skipif(not compiled.compiled_available("cuda" if torch.cuda.is_available() else "cpu"),
                                reason="torch.compile needs a C++ compiler (CPU) or Triton (CUDA)")


@pytest.mark.parametrize("density", [1.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_matches_the_for_loop(dtype, density):
    """Parameters, moments, counts and clip counts agree with the for-loop's as the fused kernel's do
    (:func:`assert_agrees_with_reference` states the tolerances)."""
    assert_agrees_with_reference(run_steps({"foreach": False}, dtype, density),
                                 run_steps({"compiled": True}, dtype, density), dtype)


@pytest.mark.parametrize("overrides", [{"maximize": True}, {"bias_correction_reset": True}, {"reference_compat": True},
                                       {"skip_nonfinite": False}, {"lr": torch.tensor(3e-3)}, {"weight_decay": 0.0}])
def test_compiled_matches_the_for_loop_for_each_option(overrides):
    ref_params, *_ = run_steps({"foreach": False}, torch.float32, 0.5, **overrides)
    params, *_ = run_steps({"compiled": True}, torch.float32, 0.5, **overrides)
    for ref, got in zip(ref_params, params):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_schedules_do_not_recompile():
    """60 steps crossing 5 resets, their warmups and clip-free windows, under a changing LR, then a second
    optimizer with other betas, eps, θ and weight decay: after the first step's kernels (one per size class
    the compiler distinguishes: 1-element tensors are specialised), no new kernel is compiled."""
    from torch._dynamo.utils import counters

    shapes = [(64, 48), (48,), (1,), (300,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = SPAM(params, compiled=True, **HYPER)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    stream = spiky_gradients(shapes, 61, seed=3, spike_rate=0.05)
    set_grads(params, stream[0])
    opt.step()
    after_first = counters["stats"]["unique_graphs"]
    for grads in stream[1:]:
        set_grads(params, grads)
        opt.step()
        scheduler.step()
    other = SPAM(params, compiled=True, lr=3e-4, betas=(0.8, 0.95), eps=1e-8, threshold=10.0, weight_decay=0.3)
    other.step()
    assert counters["stats"]["unique_graphs"] == after_first


def test_compiled_is_the_cpu_default_only_for_large_groups(monkeypatch):
    """A group at or above ``compile_min_numel`` elements takes the compiled step by default on the CPU; a smaller
    one, or any group given an implementation flag, does not; without a compiler the default falls back to
    the for-loop and ``compiled=True`` raises an error saying what is missing."""
    param = torch.nn.Parameter(torch.randn(100))
    chosen = lambda opt: opt._implementation(opt.param_groups[0], [param])  # noqa: E731
    if param.device.type == "cpu":
        assert chosen(SPAM([param])) == "forloop"
        monkeypatch.setattr(SPAM, "compile_min_numel", 100)
        assert chosen(SPAM([param])) == "compiled"
        assert chosen(SPAM([param], foreach=True)) == "foreach"
        assert chosen(SPAM([param], compiled=False)) == "forloop"
    monkeypatch.setattr(compiled, "compiled_available", lambda device_type: False)
    assert chosen(SPAM([param])) in ("forloop", "foreach")
    with pytest.raises(RuntimeError, match="compiled=True needs torch.compile's backend"):
        chosen(SPAM([param], compiled=True))


def test_flags_are_checked():
    param = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="Invalid foreach/compiled values"):
        SPAM([param], foreach=True, compiled=True)
    with pytest.raises(ValueError, match="Invalid compiled value"):
        SPAM([param], compiled="yes")
    with pytest.raises(ValueError, match="Invalid capturable value"):
        SPAM([param], capturable=True, compiled=True)
