"""The fused Triton step equals the for-loop reference: fp32, bf16 and fp16 parameters (fp32 moments), odd
sizes, 0-dim, empty, non-contiguous and many small tensors, dense and sparse groups, resets, clipping, the
post-reset warmup, weight decay, maximize, non-finite skips and clip counts. Without a GPU the kernel runs in
Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), on small shapes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spamopt import SPAM
from spamopt.optim.schedule import is_mask_redraw_step

from .probes import Allocations, HostReads
from .streams import set_grads, spiky_gradients
from .stress import DEVICE, HYPER, assert_agrees_with_reference
from .stress import run_steps as _run
from .stress import stress_groups as _groups
from .stress import stress_params as _params

triton = pytest.importorskip("triton")
@pytest.mark.parametrize("density", [1.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_matches_the_for_loop(dtype, density):
    """Same parameters (fp32: 1e-5 relative; half precision: one unit in the last place, since both compute in
    fp32 and round once, but in a different operation order), same fp32 moments, bias-correction counts and
    clip counts. A half-precision value rounded one unit apart at one step keeps that absolute difference as it
    later shrinks (measured: one bf16 coordinate, a unit apart at 0.0084, is 6.1e-5 apart at 0.0037), hence an
    absolute 1e-4 beside the one-unit relative tolerance."""
    assert_agrees_with_reference(_run({"foreach": False}, dtype, density), _run({"fused": True}, dtype, density),
                                 dtype)


@pytest.mark.parametrize("overrides", [{"maximize": True}, {"bias_correction_reset": True}, {"reference_compat": True},
                                       {"skip_nonfinite": False}, {"lr": torch.tensor(3e-3)}])
def test_fused_matches_the_for_loop_for_each_option(overrides):
    ref_params, *_ = _run({"foreach": False}, torch.float32, 0.5, **overrides)
    params, *_ = _run({"fused": True}, torch.float32, 0.5, **overrides)
    for ref, got in zip(ref_params, params):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [1.0, 0.25])
def test_aligned_buckets_take_the_vector_path_and_agree(monkeypatch, dtype, density):
    """Buckets whose addresses are 16-byte aligned and whose lengths are multiples of 8 (every LLaMA tensor)
    launch the kernel's vector variant (``ALIGNED``); a 7-element tensor makes its bucket take the general
    one. Both agree with the for-loop. (The interpreter ignores the alignment hints: the compiled
    accesses are checked in test_kernel_build_for_hopper.)"""
    from spamopt.optim import fused

    launches = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["ALIGNED"])
                return real[grid](*args, **kwargs)
            return launch

    real = fused._spam_kernel
    monkeypatch.setattr(fused, "_spam_kernel", Spy())
    # The matrix and the vectors are in different groups, hence buckets: only the vectors' bucket has the 7.
    for shapes, variants in ([(64, 80), (128,), (8200,)], {True}), ([(64, 80), (128,), (7,)], {True, False}):
        gen = torch.Generator().manual_seed(0)
        inits = [torch.randn(s, generator=gen).to(DEVICE, dtype) * 0.1 for s in shapes]
        stream = spiky_gradients(shapes, 8, seed=2, spike_rate=0.05)
        results = []
        for implementation in ({"fused": True}, {"foreach": False}):
            params = [torch.nn.Parameter(t.clone()) for t in inits]
            opt = SPAM(_groups(params, density), **HYPER, **implementation)
            for grads in stream:
                set_grads(params, grads)
                opt.step()
            results.append(params)
        ulp = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}[dtype]
        for got, ref in zip(*results):
            torch.testing.assert_close(got, ref, rtol=ulp, atol=1e-6)
        assert set(launches) == variants
        launches.clear()


def test_state_moves_between_fused_and_for_loop():
    """The fused step keeps the state layout: a run that switches implementation halfway through (through
    state_dict) ends where the for-loop run ends."""
    ref_params, *_ = _run({"foreach": False}, torch.float32, 0.5)
    params = _params(torch.float32)
    stream = spiky_gradients([tuple(p.shape) for p in params], 12, seed=1, spike_rate=0.05)
    stream[6][3][0, 0] = float("nan")
    opt = SPAM(_groups(params, 0.5), **HYPER, fused=True)
    for step, grads in enumerate(stream, start=1):
        if step == 6:
            saved = opt.state_dict()
            opt = SPAM(_groups(params, 0.5), **HYPER, foreach=False)
            opt.load_state_dict(saved)
        set_grads(params, grads)
        opt.step()
    for ref, got in zip(ref_params, params):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_fused_arguments_are_checked(monkeypatch):
    params = _params(torch.float32)[:2]
    with pytest.raises(ValueError, match="foreach/fused"):
        SPAM(params, foreach=True, fused=True)
    with pytest.raises(ValueError, match="Invalid fused value"):
        SPAM(params, fused="yes")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        opt = SPAM(params, fused=True)
        for p in params:
            p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match="fused=True needs Triton"):
            opt.step()


def test_fused_is_the_default_only_on_cuda():
    params = _params(torch.float32)[:2]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = SPAM(params)
    calls = []
    import spamopt.optim.functional as functional

    original = functional._fused_spam
    functional._fused_spam = lambda *a, **k: (calls.append(1), original(*a, **k))
    try:
        opt.step()
    finally:
        functional._fused_spam = original
    assert bool(calls) == (DEVICE == "cuda")


@pytest.mark.parametrize("reset_interval,warmup_steps,clip_delay,threshold",
                         [(0, 0, 0, 5000.0), (1, 0, 0, 5.0), (2, 1, 1, 5.0), (7, 3, 2, 5.0), (50, 20, 5, 0.0),
                          (500, 150, 20, 5000.0)])
def test_device_decisions_equal_the_scalar_schedule(reset_interval, warmup_steps, clip_delay, threshold):
    """The tensor schedule a captured graph uses takes, at every step τ = 1…1200, the decisions of the scalar
    functions the other paths use."""
    from spamopt.optim import schedule

    steps = torch.arange(1, 1201, dtype=torch.int64)
    reset, in_force, multiplier = schedule.device_decisions(steps, threshold, reset_interval, warmup_steps,
                                                            clip_delay)
    for tau in range(1, 1201):
        assert bool(reset[tau - 1]) == schedule.is_reset_step(tau, reset_interval)
        active = schedule.clipping_active(tau, threshold, reset_interval, clip_delay)
        assert float(in_force[tau - 1]) == (threshold if active else 0.0)
        assert float(multiplier[tau - 1]) == pytest.approx(
            schedule.warmup_multiplier(tau, reset_interval, warmup_steps), abs=1e-12)


@pytest.mark.parametrize("bias_correction_reset", [False, True])
def test_capturable_matches_the_for_loop(bias_correction_reset):
    """With the clock on the device and every decision taken there, the step is the same."""
    ref_params, *_ = _run({"foreach": False}, torch.float32, 1.0, bias_correction_reset=bias_correction_reset)
    params, opt, _ = _run({"capturable": True, "lr": torch.tensor(HYPER["lr"], device=DEVICE)}, torch.float32,
                          1.0, bias_correction_reset=bias_correction_reset)
    for ref, got in zip(ref_params, params):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    clock = opt.state[params[0]]["global_step"]
    assert clock.device == params[0].device and int(clock) == 12
    reloaded = SPAM(_groups(params, 1.0), **HYPER, capturable=True)
    reloaded.load_state_dict(opt.state_dict())
    assert reloaded.state[params[0]]["global_step"].device == params[0].device


def test_capturable_arguments_are_checked():
    params = _params(torch.float32)[:3]
    with pytest.raises(ValueError, match="needs the fused implementation"):
        SPAM(params, capturable=True, fused=False)
    with pytest.raises(ValueError, match="Invalid density value: 0.5 with capturable=True"):
        SPAM(params, capturable=True, density=0.5)
    with pytest.raises(ValueError, match="every parameter group must use the same"):
        SPAM([{"params": params[:1]}, {"params": params[1:], "capturable": True}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_step_captured_in_a_cuda_graph_replays_like_eager_steps():
    """Capture one step after three warm-up steps, then replay it over a gradient stream that crosses a reset,
    the post-reset warmup and a non-finite step: parameters equal the eager capturable run's."""
    stream = spiky_gradients([(257, 129), (1000,)], 14, seed=3, spike_rate=0.05)
    stream[9][0][0, 0] = float("nan")

    def fresh():
        params = [torch.nn.Parameter(torch.full(s, 0.1, device="cuda")) for s in [(257, 129), (1000,)]]
        return params, SPAM(params, **{**HYPER, "lr": torch.tensor(1e-2, device="cuda")}, capturable=True)

    eager_params, eager = fresh()
    for grads in stream:
        set_grads(eager_params, grads)
        eager.step()

    params, opt = fresh()
    for p, g in zip(params, stream[0]):
        p.grad = torch.tensor(g, device="cuda", dtype=torch.float32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for grads in stream[:3]:
            for p, g in zip(params, grads):
                p.grad.copy_(torch.tensor(g))
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for grads in stream[3:]:
        for p, g in zip(params, grads):
            p.grad.copy_(torch.tensor(g))
        graph.replay()
    for got, ref in zip(params, eager_params):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


@functools.cache  # the traffic test reads the same build as the spill test: compile each variant once
def _hopper_build(*variant: str) -> dict:
    """Build one kernel variant for an H100 in a subprocess (see compile_kernel.py) and return its report."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton build has no NVIDIA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernel.py")
    result = subprocess.run([sys.executable, str(script), *variant], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("variant", [("float32", "dense", "aligned"), ("bfloat16", "sparse", "aligned"),
                                     ("float32", "dense", "general")])
def test_kernel_compiles_for_hopper_without_spills(variant):
    """The interpreter does not prove the kernel compiles: build it for an H100 (sm_90) with Triton's compiler
    and ptxas — no GPU needed — and check that nothing spills to local memory."""
    usage = _hopper_build(*variant)["usage"]
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage


@pytest.mark.parametrize("variant", [("float32", "dense", "aligned"), ("bfloat16", "sparse", "aligned")])
def test_kernel_rounds_every_operation_as_torch_does(variant):
    """The interpreter computes in numpy, so it cannot see how the GPU rounds: read the PTX. Square roots and the
    division are IEEE round-to-nearest (Triton's defaults, sqrt.approx.ftz and div.full, flush a subnormal v to
    0 and err by 2 ulp) and no multiply-add is contracted into an FMA, so each operation rounds as the for-loop's
    torch ops do. With the defaults, on an H200, the fused moments were 1.3e-5 apart from the for-loop's."""
    arithmetic = _hopper_build(*variant)["arithmetic"]
    assert set(arithmetic) == {"sqrt.rn.f32", "div.rn.f32"}, arithmetic


@pytest.mark.parametrize("dtype,bytes_read,bytes_written", [("float32", 16, 12), ("bfloat16", 12, 10)])
def test_aligned_dense_kernel_moves_the_floor_in_128_bit_accesses(dtype, bytes_read, bytes_written):
    """The memory traffic of the compiled aligned dense kernel, read from its PTX: every access to p, g, m, v
    is a 128-bit vector load or store, and per element it reads p, g, m, v once and writes p, m, v once —
    28 bytes for fp32 params, 22 for bf16 params with fp32 moments — plus a few scalars per program."""
    report = _hopper_build(dtype, "dense", "aligned")
    accesses, per_element = report["accesses"], report["threads"] / report["block"]
    assert accesses["ld.global.v4.b32"] * 16 * per_element == bytes_read
    assert accesses["st.global.v4.b32"] * 16 * per_element == bytes_written
    assert set(accesses) == {"ld.global.v4.b32", "st.global.v4.b32", "ld.global.b32", "ld.global.b64"}
    assert accesses["ld.global.b32"] + accesses["ld.global.b64"] <= 16  # table entries and step scalars


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("density", [1.0, 0.25])
def test_fused_step_never_synchronises_with_the_host(density):
    """With CUDA's sync debug mode set to error, twelve default (fused) steps — across a reset, a mask redraw,
    the clip delay and a non-finite step — run without a single host synchronisation."""
    params = _params(torch.float32)
    opt = SPAM(_groups(params, density), **HYPER)
    stream = spiky_gradients([tuple(p.shape) for p in params], 14, seed=1, spike_rate=0.05)
    stream[9][3][0, 0] = float("nan")
    grads = [[torch.tensor(g, dtype=torch.float32, device="cuda") for g in step] for step in stream]
    for step in grads[:2]:  # state, clock and address tables are created here
        for p, g in zip(params, step):
            p.grad = g
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in grads[2:]:
            for p, g in zip(params, step):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_host_read_detector_sees_what_would_synchronise():
    """The detector used below is not blind: a value read, a tensor in ``if`` and boolean-mask indexing
    (reading and writing) are each recorded, and a read of an allowed host tensor is not."""
    x, clock = torch.randn(6), torch.tensor(3)
    with HostReads(allowed=[clock]) as reads:
        int(clock)
        assert len(reads.seen) == 0
        x.max().item()
        bool(x.sum() > 0)
        x[x > 0]
        x[x > 0] = 0.0
    assert len(reads.seen) == 4, reads.seen


@pytest.mark.parametrize("options", [dict(fused=True, capturable=True), dict(fused=True),
                                     dict(fused=True, density=0.25), dict(foreach=True)],
                         ids=["fused_capturable", "fused", "fused_sparse", "foreach"])
def test_step_reads_no_device_value_on_the_host(options):
    """Runs on the CPU, where CUDA's sync debug mode cannot: twelve steps across resets, mask redraws, the clip
    delay and a non-finite step make no operation that waits for the device's values (see probes.py).
    The only values read are the step clock and mask seeds that SPAM keeps on the host by design; with
    ``capturable`` the clock lives on the device and not even it is read."""
    options = dict(options)
    params = _params(torch.float32)
    opt = SPAM(_groups(params, options.pop("density", 1.0)), **{**HYPER, **options})
    opt.record_statistics = True
    stream = spiky_gradients([tuple(p.shape) for p in params], 14, seed=1, spike_rate=0.05)
    stream[9][3][0, 0] = float("nan")
    set_grads(params, stream[0])
    opt.step()  # creates the state
    host_state = [] if options.get("capturable") else [
        s[key] for s in opt.state.values() for key in ("global_step", "mask_seed") if key in s]
    for grads in stream[1:]:
        set_grads(params, grads)
        with HostReads(allowed=host_state) as reads:
            opt.step()
        assert reads.seen == [], reads.seen
    assert int(opt.state[params[3]]["skipped_steps"]) == 1


@pytest.mark.parametrize("options", [dict(fused=True), dict(fused=True, capturable=True),
                                     dict(fused=True, density=0.25), dict(foreach=True)],
                         ids=["fused", "fused_capturable", "fused_sparse", "foreach"])
def test_fused_step_creates_no_parameter_sized_tensor(options):
    """No peak memory beyond the optimizer state: in the steps after the first that draw no new masks (a
    reset among them), on three 120,000-element matrices, the largest tensor the fused step creates holds a
    few scalars per parameter (step sizes, address and chunk tables), not a temporary the size of a
    parameter. The foreach row shows the probe sees such temporaries where they exist."""
    options = dict(options)
    params = [torch.nn.Parameter(torch.randn(300, 400, device=DEVICE)) for _ in range(3)]
    params.append(torch.nn.Parameter(torch.randn(1000, device=DEVICE)))
    opt = SPAM([{"params": params[:3], "density": options.pop("density", 1.0)}, {"params": params[3:]}],
               **{**HYPER, "reset_interval": 3, **options})
    largest = 0
    for step in range(1, 7):
        for p in params:
            p.grad = torch.randn_like(p)
        with Allocations() as allocations:
            opt.step()
        # The first step creates the state; a mask redraw (once a period) draws in bounded blocks (sparse.py).
        if step > 1 and not is_mask_redraw_step(step, 3):
            largest = max(largest, *(size for size, _ in allocations.created))
    if options.get("fused"):
        assert largest <= 64 * len(params), largest
    else:
        assert largest >= params[0].numel() * 4
