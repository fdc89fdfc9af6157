"""Parameters and a gradient stream that stress an implementation of the SPAM step (chunking, odd and empty
sizes, non-contiguous memory, many small tensors, dense and sparse groups, a non-finite step), shared by the
tests that hold an implementation to the for-loop reference."""

from __future__ import annotations

import torch

from spamopt import SPAM

from .streams import set_grads, spiky_gradients

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=1e-2, weight_decay=0.1, reset_interval=5, warmup_steps=2, clip_delay=1, threshold=4.0)


def stress_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    """Shapes that stress the chunking: one element, odd sizes, more than one 4096-element chunk with a
    ragged tail, a 0-dim and an empty tensor, a transposed (non-contiguous) matrix and 40 tiny tensors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (3, 5), (70, 90), (4097,), (), (0,), (33, 129)]
    params = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    params.append((torch.randn(90, 60, generator=gen) * 0.1).t())  # non-contiguous
    params += [torch.randn(3, generator=gen) for _ in range(40)]
    return [torch.nn.Parameter(p.to(device=DEVICE, dtype=dtype)) for p in params]


def stress_groups(params, density):
    matrices = [p for p in params if p.dim() == 2]
    others = [p for p in params if p.dim() != 2]
    return [{"params": matrices, "density": density}, {"params": others}]


def run_steps(implementation: dict, dtype: torch.dtype, density: float, steps: int = 12, nonfinite_at: int = 7,
              **overrides):
    params = stress_params(dtype)
    opt = SPAM(stress_groups(params, density), **{**HYPER, **overrides, **implementation})
    opt.record_statistics = True
    stream = spiky_gradients([tuple(p.shape) for p in params], steps, seed=1, spike_rate=0.05)
    counts = []
    for step, grads in enumerate(stream, start=1):
        if step == nonfinite_at:
            grads[3][0, 0] = float("nan")
        set_grads(params, grads)
        given = [p.grad.clone() for p in params]
        opt.step()
        for p, g in zip(params, given):  # p.grad is read only
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
        counts.append([int(opt.last_statistics["clipped"].get(p, 0)) for p in params])
    return params, opt, counts


def assert_agrees_with_reference(reference: tuple, run: tuple, dtype: torch.dtype) -> None:
    """``run`` = (params, optimizer, clip counts) of :func:`run_steps` agrees with the for-loop's ``reference``:
    parameters within one unit in the last place (fp32: 1e-5; half precision also 1e-4 absolute, as both
    compute in fp32 and round once in a different operation order, and a unit once apart stays apart as the
    value shrinks), fp32 moments to 1e-5, bias-correction and skip counts exactly, clip counts exactly in fp32;
    clipping fired and the non-finite step was skipped, so the comparison saw both."""
    (ref_params, ref_opt, ref_counts), (params, opt, counts) = reference, run
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for ref, got in zip(ref_params, params):
        torch.testing.assert_close(got, ref, rtol=ulp, atol=1e-6 if dtype == torch.float32 else 1e-4)
        ref_state, state = ref_opt.state[ref], opt.state[got]
        assert state["exp_avg"].dtype == torch.float32
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-5, atol=1e-9)
        for key in ("step", "skipped_steps"):
            assert torch.equal(state[key], ref_state[key])
    if dtype == torch.float32:
        assert counts == ref_counts
    assert sum(map(sum, ref_counts)) > 0, "clipping never fired: the test would not see it"
    assert ref_opt.state[ref_params[0]]["skipped_steps"] == 1
