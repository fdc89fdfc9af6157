"""The compiled step (``compiled=True``: one ``torch.compile`` loop per tensor) equals the for-loop reference
on the stress set of every implementation (fp32, bf16, fp16; dense and sparse; resets, clipping, warmup,
decay, a non-finite step, clip counts) and for each option; a long run across resets, warmup, clipping
switching on and off and an LR schedule compiles a bounded number of kernels; it is the CPU default only for
large groups, and refuses clearly where it cannot run. The same for StableSPAM's compiled step. These tests
run the torch.compile kernels themselves (``SPAMOPT_NATIVE=0``); ``test_native.py`` holds the native loops,
which take their place for dense float32/float64 CPU tensors, to these kernels' results."""

from __future__ import annotations

import sys

import pytest
import torch

from spamopt import SPAM, StableSPAM
from spamopt.optim import compiled

from .streams import set_grads, spiky_gradients
from .stress import HYPER, assert_agrees_with_reference, run_steps, stress_params

pytestmark = pytest.mark.skipif(not compiled.compiled_available("cuda" if torch.cuda.is_available() else "cpu"),
                                reason="torch.compile needs a C++ compiler (CPU) or Triton (CUDA)")


@pytest.fixture(autouse=True)
def _torch_compile_kernels_only(monkeypatch):
    monkeypatch.setenv("SPAMOPT_NATIVE", "0")


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


def _assert_schedules_compile_nothing_new(make, make_other, steps: int) -> None:
    """Step ``make(params)`` under a changing LR for ``steps`` steps, then ``make_other(params)`` once: after the
    first step's kernels (one per size class the compiler distinguishes: 1-element tensors are specialised),
    no new kernel is compiled."""
    from torch._dynamo.utils import counters

    shapes = [(64, 48), (48,), (1,), (300,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = make(params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    stream = spiky_gradients(shapes, steps + 1, seed=3, spike_rate=0.05)
    set_grads(params, stream[0])
    opt.step()
    after_first = counters["stats"]["unique_graphs"]
    for grads in stream[1:]:
        set_grads(params, grads)
        opt.step()
        scheduler.step()
    make_other(params).step()
    assert counters["stats"]["unique_graphs"] == after_first


def test_schedules_do_not_recompile():
    """60 steps crossing 5 resets, their warmups and clip-free windows, under a changing LR, then a second
    optimizer with other betas, eps, θ and weight decay: nothing new is compiled after the first step."""
    _assert_schedules_compile_nothing_new(
        lambda params: SPAM(params, compiled=True, **HYPER),
        lambda params: SPAM(params, compiled=True, lr=3e-4, betas=(0.8, 0.95), eps=1e-8, threshold=10.0,
                            weight_decay=0.3), steps=60)


def test_compiled_is_the_cpu_default_only_for_large_groups(monkeypatch):
    """A group at or above ``compile_min_numel`` elements takes the compiled step by default on the CPU; a smaller
    one, or any group given an implementation flag, does not (with the native loops off; with them on, see
    ``test_native.py``); without a compiler the default falls back to the for-loop and ``compiled=True`` raises
    an error saying what is missing."""
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the C++ backend's code")
def test_the_threaded_build_keeps_its_parallel_loop_whatever_size_compiled_it():
    """The C++ backend would decide from the first (compiled) size whether the loop runs on several threads, and
    its disk cache would pass a one-thread kernel, built for a bias, to a later run's 16M-element embedding:
    the multi-threaded build keeps the parallel loop even when compiled for 100 elements, the one-thread build
    (for small tensors, where starting threads costs more than it saves) has none, and the step picks the
    build by size."""
    from torch._inductor.utils import run_and_get_code

    n = 100
    tensors = [torch.randn(n), torch.randn(n), torch.zeros(n), torch.rand(n), torch.tensor(-1e-3, dtype=torch.float64),
               torch.tensor([1, 5, 0, 1, 1, 0.1, 0.001, 1e-6], dtype=torch.float64)]
    torch._dynamo.reset()
    compiled.spam_kernel.cache_clear()
    for threaded in (True, False):
        with torch._inductor.config.patch(force_disable_caches=True), compiled.limits():
            _, code = run_and_get_code(compiled.spam_kernel(False, threaded), *[t.clone() for t in tensors])
        assert ("#pragma omp parallel" in "".join(code)) == threaded
    assert not compiled.parallel(compiled.PARALLEL_MIN_NUMEL - 1) and compiled.parallel(compiled.PARALLEL_MIN_NUMEL)


@pytest.mark.parametrize("optimizer", [SPAM, StableSPAM])
def test_the_threaded_build_matches_the_for_loop(optimizer):
    """Tensors of PARALLEL_MIN_NUMEL elements or more take the multi-threaded build (its reductions split over
    threads): 8 steps across a reset with spikes agree with the for-loop as the one-thread build does."""
    shapes = [(300, 300), (7,)]
    assert compiled.parallel(300 * 300)
    stream = spiky_gradients(shapes, 8, seed=5, spike_rate=0.01)
    results = []
    for implementation in ({"foreach": False}, {"compiled": True}):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        opt = optimizer(params, lr=1e-2, reset_interval=5, **implementation)
        for grads in stream:
            set_grads(params, grads)
            opt.step()
        results.append(params)
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


_ONE_THEN_TWO_THREADS = """
import sys, torch
sys.path.insert(0, {tests!r})
from spamopt import SPAM, StableSPAM
from streams import set_grads, spiky_gradients
shapes = [(300, 300), (7,)]
stream = spiky_gradients(shapes, 8, seed=5, spike_rate=0.01)
for optimizer in (SPAM, StableSPAM):
    results = []
    for implementation in ({{"foreach": False}}, {{"compiled": True}}):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        opt = optimizer(params, lr=1e-2, reset_interval=5, **implementation)
        for i, grads in enumerate(stream):
            torch.set_num_threads(1 if i == 0 else 2)  # compiled during the first step, on one thread
            set_grads(params, grads)
            opt.step()
        results.append((params, [float(s["step"]) for s in opt.state.values()]))
    (ref, ref_steps), (got, got_steps) = results
    assert got_steps == ref_steps, (optimizer.__name__, got_steps, ref_steps)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
"""


def test_kernels_compiled_on_one_thread_run_right_on_two(tmp_path):
    """torch.compile generates a C++ kernel for the thread count of the process compiling it, and its disk
    cache hands the kernel to every later process. Stable-SPAM's kernel once advanced the step counters inside
    its last parallel loop: compiled on one thread and called on two, every thread advanced them, so k and n
    counted each step twice and the debiasing went wrong (0.006 off after 8 steps). Here, in a fresh process
    and cache, both optimizers compile on one thread and then step on two, and must still match the for-loop,
    counters included."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = _ONE_THEN_TWO_THREADS.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def test_flags_are_checked():
    param = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="Invalid foreach/compiled values"):
        SPAM([param], foreach=True, compiled=True)
    with pytest.raises(ValueError, match="Invalid compiled value"):
        SPAM([param], compiled="yes")
    with pytest.raises(ValueError, match="Invalid capturable value"):
        SPAM([param], capturable=True, compiled=True)


# ------------------------------------------------------------------------------------------------ StableSPAM

STABLE = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, gamma1=0.7, gamma2=0.9, gamma3=0.99,
              reset_interval=5)


def _stable_run(implementation: dict, dtype: torch.dtype, steps: int = 12, nonfinite_at: int = 7, **overrides):
    params = stress_params(dtype)
    opt = StableSPAM(params, **{**STABLE, **overrides, **implementation})
    stream = spiky_gradients([tuple(p.shape) for p in params], steps, seed=2, spike_rate=0.05)
    for step, grads in enumerate(stream, start=1):
        if step == nonfinite_at:
            grads[3][0, 0] = float("nan")
        set_grads(params, grads)
        given = [p.grad.clone() for p in params]
        opt.step()
        assert all(torch.equal(p.grad, g) or torch.isnan(g).any() for p, g in zip(params, given))
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stable_spam_compiled_matches_the_for_loop(dtype):
    """Stable-SPAM's compiled step on the stress set (odd, empty, 0-dim, non-contiguous and many small tensors),
    across two resets and a skipped non-finite step: parameters within one unit in the last place, moments,
    AdaClip's and AdaGN's statistics to 1e-5 (1e-4 for half-precision parameters, whose gradient norms the
    two sum in a different order), counts exactly. (Its float64 agreement with the specification's
    transcription is in test_stable_spam.py.)"""
    ref_params, ref_opt = _stable_run({"foreach": False}, dtype)
    params, opt = _stable_run({"compiled": True}, dtype)
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for ref, got in zip(ref_params, params):
        torch.testing.assert_close(got, ref, rtol=ulp, atol=1e-6 if dtype == torch.float32 else 1e-4)
        for key, value in ref_opt.state[ref].items():
            if key in ("step", "stat_step", "global_step", "skipped_steps"):
                assert torch.equal(opt.state[got][key], value), key
            else:
                torch.testing.assert_close(opt.state[got][key], value, rtol=1e-5 if dtype == torch.float32 else 1e-4,
                                           atol=1e-9)
    assert int(ref_opt.state[ref_params[0]]["skipped_steps"]) == 1


@pytest.mark.parametrize("overrides", [{"maximize": True}, {"skip_nonfinite": False}, {"lr": torch.tensor(3e-3)},
                                       {"adaclip": "clamp"}, {"adaclip": "off", "adagn": False},
                                       {"total_steps": 8, "eta_min": 0.3}])
def test_stable_spam_compiled_matches_the_for_loop_for_each_option(overrides):
    ref_params, _ = _stable_run({"foreach": False}, torch.float32, **overrides)
    params, _ = _stable_run({"compiled": True}, torch.float32, **overrides)
    for ref, got in zip(ref_params, params):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_stable_spam_schedules_do_not_recompile():
    """40 steps across resets, the σ schedule and a changing LR, then another optimizer with other betas, γs,
    eps and decay: nothing new is compiled after the first step."""
    _assert_schedules_compile_nothing_new(
        lambda params: StableSPAM(params, compiled=True, total_steps=30, **STABLE),
        lambda params: StableSPAM(params, compiled=True, lr=3e-4, betas=(0.8, 0.95), eps=1e-6, gamma1=0.85,
                                  gamma2=0.99999, weight_decay=0.3), steps=40)


def test_stable_spam_compiled_choice_and_its_limits(monkeypatch):
    """Large CPU groups take the compiled step by default, as SPAM's do, except under reference_compat (the
    released code's late reset has no compiled path), where compiled=True is refused by name."""
    param = torch.nn.Parameter(torch.randn(100))
    chosen = lambda opt: opt._implementation(opt.param_groups[0], [param])  # noqa: E731
    monkeypatch.setattr(StableSPAM, "compile_min_numel", 100)
    if param.device.type == "cpu":
        assert chosen(StableSPAM([param])) == "compiled"
    assert chosen(StableSPAM([param], reference_compat=True)) in ("forloop", "foreach")
    with pytest.raises(ValueError, match="Invalid compiled value: True with reference_compat=True"):
        StableSPAM([param], compiled=True, reference_compat=True)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "threaded"])
def test_the_sparse_loop_equals_the_dense_kernel_on_gathered_copies(threaded, index_dtype):
    """A sparse parameter's compiled loop reads and writes its kept coordinates itself; that is bit for bit the
    dense kernel run on gathered copies and scattered back (the implementation it replaced): parameter, moments
    and clip count (clipping fires), and the other coordinates are untouched."""
    from spamopt.optim import sparse

    numel = 3 * 4096 + 100
    bits = sparse.draw_mask(numel, 0.25, seed=2, generation=0, device="cpu")
    kept = sparse.kept_index(bits, numel)
    gen = torch.Generator().manual_seed(0)
    param, grad = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen) * 3
    m, v = torch.randn(len(kept), generator=gen) * 0.1, torch.rand(len(kept), generator=gen) * 0.5
    step_size = torch.tensor(-1e-2, dtype=torch.float64)
    scalars = torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0, 0.1, 0.001, 1e-6], dtype=torch.float64)
    kernel = compiled.spam_kernel(True, threaded)
    with compiled.limits():
        ref_param, ref_m, ref_v = param.clone(), m.clone(), v.clone()
        work = sparse.gather(ref_param, kept)
        ref_count = kernel(work, sparse.gather(grad, kept), ref_m, ref_v, step_size, scalars)
        sparse.scatter_(ref_param, kept, work)
        count = kernel(param, grad, m, v, step_size, scalars, kept.to(index_dtype))
    assert int(ref_count) > 0 and int(count) == int(ref_count)
    assert torch.equal(param, ref_param) and torch.equal(m, ref_m) and torch.equal(v, ref_v)


@pytest.mark.parametrize("dtype, copies", [(torch.float32, False), (torch.bfloat16, True)])
def test_a_compiled_sparse_step_copies_out_only_half_precision_matrices(monkeypatch, dtype, copies):
    """The compiled step of an fp32 sparse matrix makes no gathered copy of its parameter or gradient (the loop
    indexes them); a bf16 one, updated in its fp32 moments' precision and rounded once after the decay, still
    gathers its kept coordinates into fp32 copies."""
    from spamopt.optim import sparse

    gathered = []
    gather = sparse.gather
    monkeypatch.setattr(sparse, "gather", lambda tensor, index: gathered.append(index) or gather(tensor, index))
    param = torch.nn.Parameter(torch.randn(64, 80, dtype=dtype))
    opt = SPAM([param], compiled=True, density=0.25, weight_decay=0.1)
    param.grad = torch.randn(64, 80, dtype=dtype)
    opt.step()
    assert bool(gathered) is copies


@pytest.mark.skipif(sys.platform != "linux", reason="counts page faults through getrusage (Linux)")
@pytest.mark.parametrize("make", [
    pytest.param(lambda ps: SPAM(ps, compiled=True, clip_delay=0), id="spam"),
    pytest.param(lambda ps: StableSPAM(ps, compiled=True), id="stable-spam"),
    pytest.param(lambda ps: StableSPAM(ps, compiled=True, adaclip="clamp"), id="stable-spam-clamp"),
    pytest.param(lambda ps: StableSPAM(ps, compiled=True, adagn=False), id="stable-spam-no-adagn")])
def test_a_compiled_step_allocates_no_temporary_of_the_parameters_size(make):
    """A warm compiled step on a 32 MiB parameter touches (almost) no new memory page: it keeps no gradient-sized
    temporary, whose fresh pages (memory this large comes straight from the OS) cost a page fault per 4 KiB on
    every call; Stable-SPAM's kernel once stored the gradient for its three loops and ran 2-4x slower. An
    8M-element temporary would fault 8,192 times; the test allows 1,024."""
    import resource

    param = torch.nn.Parameter(torch.randn(1 << 23) * 0.02)
    opt = make([param])
    faults = []
    for _ in range(3):
        param.grad = torch.randn(1 << 23) * 1e-3
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        opt.step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert faults[-1] < 1024, faults


def _peaks_replaced(monkeypatch, change):
    """Make StableSPAM's step see ``change(peaks)`` instead of the non-finite check's per-tensor max|g|."""
    found = StableSPAM._keep_and_peaks

    def replaced(self, batches, found_inf, with_peaks=True):
        keep, peaks = found(self, batches, found_inf, with_peaks)
        return keep, change(peaks)

    monkeypatch.setattr(StableSPAM, "_keep_and_peaks", replaced)


def test_stable_spam_compiled_takes_max_g_from_the_nonfinite_check(monkeypatch):
    """The compiled Stable-SPAM step reads each tensor's max|g| from the non-finite check instead of a pass of
    its own: bit for bit the result of the kernel that finds it itself (on the stress set, across resets and a
    skipped non-finite step), and the peaks are really read (doubled, they change the parameters)."""
    with monkeypatch.context() as patch:
        _peaks_replaced(patch, lambda peaks: {})
        own_params, own_opt = _stable_run({"compiled": True}, torch.float32)
    params, opt = _stable_run({"compiled": True}, torch.float32)
    for own, got in zip(own_params, params):
        assert torch.equal(got, own)
        for key, value in own_opt.state[own].items():
            assert torch.equal(opt.state[got][key], value), key
    _peaks_replaced(monkeypatch, lambda peaks: {key: 2 * peak for key, peak in peaks.items()})
    doubled, _ = _stable_run({"compiled": True}, torch.float32)
    assert any(not torch.equal(d, p) for d, p in zip(doubled, params) if d.numel())


@pytest.mark.parametrize("overrides, given", [({}, True), ({"skip_nonfinite": False}, False)])
def test_stable_spam_compiled_kernel_variant_follows_the_check(monkeypatch, overrides, given):
    """With the non-finite check on, every compiled Stable-SPAM kernel call is the variant that reads max|g|;
    with it off (nothing measured the peaks) the kernel finds max|g| itself."""
    variants = []
    kernel = compiled.stable_spam_kernel

    def spy(adaclip, adagn, threaded=True, peak_given=False):
        variants.append(peak_given)
        return kernel(adaclip, adagn, threaded, peak_given)

    monkeypatch.setattr(compiled, "stable_spam_kernel", spy)
    _stable_run({"compiled": True}, torch.float32, steps=3, **overrides)
    assert variants and set(variants) == {given}
