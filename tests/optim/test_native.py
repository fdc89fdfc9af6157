"""The native CPU loops (:mod:`spamopt.optim.native`): SPAM's group-at-once update gives the torch.compile
kernel's bits (the stress set and every option; large tensors split across threads; clip counts), is what
``compiled=True`` runs for dense float32/float64 CPU tensors (one call per group), and the finite check
agrees with ``aminmax`` on every kind of non-finite value at every position. Stable-SPAM's gives the
kernel's bits without AdaGN and agrees with the for-loop as the kernel does with it. The build is cached and
shared between processes, and a failed build or ``SPAMOPT_NATIVE=0`` falls back to the torch.compile
kernels, saying so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from spamopt import SPAM, StableSPAM
from spamopt.optim import compiled, native

from .stress import run_steps
from .test_compiled import _stable_run

pytestmark = [
    pytest.mark.skipif(not compiled.compiled_available("cpu"), reason="torch.compile needs a C++ compiler"),
    pytest.mark.skipif(native.library() is None, reason="the native loops need a C compiler with OpenMP"),
]


@pytest.fixture
def native_off(monkeypatch):
    """Switch the loops off and on within one test (``SPAMOPT_NATIVE``)."""
    def switch(on: bool) -> None:
        monkeypatch.setenv("SPAMOPT_NATIVE", "1" if on else "0")
    return switch


def _assert_same_run(a, b) -> None:
    (params_a, opt_a, counts_a), (params_b, opt_b, counts_b) = a, b
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        for key in ("exp_avg", "exp_avg_sq", "step", "skipped_steps"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), key
    assert counts_a == counts_b


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("overrides", [{}, {"maximize": True}, {"reference_compat": True}, {"skip_nonfinite": False},
                                       {"bias_correction_reset": True}, {"lr": torch.tensor(3e-3)},
                                       {"weight_decay": 0.0}, {"threshold": 0.0}])
def test_the_native_loop_gives_the_torch_compile_kernels_bits(native_off, density, overrides):
    """On the stress set (12 steps: resets, warmup, clipping, a NaN step skipped or zeroed; float32, dense
    matrices or sparse ones beside dense vectors) the compiled step with the native loop equals, bit for bit,
    the one with torch.compile kernels only: parameters, moments, counters and clip counts."""
    native_off(False)
    reference = run_steps({"compiled": True}, torch.float32, density, **overrides)
    native_off(True)
    _assert_same_run(run_steps({"compiled": True}, torch.float32, density, **overrides), reference)


def _large(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    """Tensors across the one-thread line (``PARALLEL_MIN_NUMEL``), with lengths that leave vector tails."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 17, native.PARALLEL_MIN_NUMEL - 1, native.PARALLEL_MIN_NUMEL, 3 * native.PARALLEL_MIN_NUMEL + 5]
    return [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=dtype)) for n in sizes]


def _run_large(dtype: torch.dtype, threads: int, steps: int = 4) -> tuple[list[torch.Tensor], SPAM, list]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = _large(dtype)
        opt = SPAM(params, compiled=True, lr=1e-2, threshold=2.0, clip_delay=0, warmup_steps=0)
        opt.record_statistics = True
        gen = torch.Generator().manual_seed(1)
        counts = []
        for step in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
                if step == 2:  # spikes
                    p.grad[:: max(1, p.numel() // 7)] *= 1e3
            opt.step()
            counts.append([int(opt.last_statistics["clipped"].get(p, 0)) for p in params])
        return params, opt, counts
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensors_split_across_threads_give_the_same_bits(native_off, dtype):
    """Tensors from 1 to 3·2^16 + 5 elements, float32 and float64, on two threads (large ones split in shares,
    small ones given whole to a thread) and on one: the same bits as the torch.compile kernels, clip counts
    summed over the shares included (and clipping fired)."""
    native_off(False)
    reference = _run_large(dtype, threads=2)
    native_off(True)
    for threads in (2, 1):
        run = _run_large(dtype, threads)
        _assert_same_run(run, reference)
    assert sum(map(sum, reference[2])) > 0


def test_compiled_steps_a_dense_group_in_one_native_call(monkeypatch):
    """``compiled=True`` sends a group's dense float32 tensors to the native loop in one call per group, and the
    torch.compile kernel only their sparse (and half-precision) ones."""
    calls, kernel_calls = [], []
    update = native.spam_update

    def counted(params, *args, **kwargs):
        calls.append(len(params))
        return update(params, *args, **kwargs)

    kernel = compiled.spam_kernel

    def counted_kernel(*args, **kwargs):
        kernel_calls.append(args)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(native, "spam_update", counted)
    monkeypatch.setattr(compiled, "spam_kernel", counted_kernel)
    dense = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(5)]
    half = [torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))]
    sparse_matrix = [torch.nn.Parameter(torch.randn(16, 8))]
    opt = SPAM([{"params": dense + half}, {"params": sparse_matrix, "density": 0.5}], compiled=True)
    for p in dense + half + sparse_matrix:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [5]
    assert len(kernel_calls) == 2  # the bfloat16 vector and the sparse matrix


def test_switched_off_nothing_native_runs(monkeypatch, native_off):
    """``SPAMOPT_NATIVE=0``: neither the update nor the finite check goes through the native loops."""
    def refuse(*args, **kwargs):
        raise AssertionError("native loop called")

    monkeypatch.setattr(native, "spam_update", refuse)
    monkeypatch.setattr(native, "finite_peaks", refuse)
    native_off(False)
    param = torch.nn.Parameter(torch.randn(64))
    param.grad = torch.randn(64)
    SPAM([param], compiled=True).step()
    StableSPAM([param], compiled=True).step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_finite_check_agrees_with_aminmax_on_every_non_finite_value(dtype):
    """Each tensor's max|g| equals aminmax's, exactly, on tensors of 1 to 3·2^16 + 5 elements (vector tails,
    shares of two threads); NaN, +Inf and −Inf at the first, a middle and the last position of any one tensor
    each make the flag False and that tensor's peak NaN, the others' staying exact; the largest finite value
    is finite."""
    grads = [p.detach().clone() for p in _large(dtype)]
    expected = torch.stack([torch.stack(torch.aminmax(g)) for g in grads]).abs().amax(1)
    finite, peaks = native.finite_peaks(grads)
    assert bool(finite) and torch.equal(peaks, expected)
    grads[2][7] = torch.finfo(dtype).max
    finite, peaks = native.finite_peaks(grads)
    assert bool(finite) and peaks[2] == torch.finfo(dtype).max
    for t in range(len(grads)):
        for position in {0, grads[t].numel() // 2, grads[t].numel() - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                spoiled = [g.clone() for g in grads]
                spoiled[t][position] = bad
                finite, peaks = native.finite_peaks(spoiled)
                assert not bool(finite), (t, position, bad)
                assert torch.isnan(peaks[t])
                others = [k for k in range(len(grads)) if k != t]
                assert torch.isfinite(peaks[others]).all()


def test_the_optimizers_check_uses_it_and_skips_the_step(monkeypatch):
    """A float32 group's non-finite check goes through the native pass (one call), and a NaN found there skips
    the step: nothing changes."""
    calls = []
    check = native.finite_peaks

    def counted(grads):
        calls.append(len(grads))
        return check(grads)

    monkeypatch.setattr(native, "finite_peaks", counted)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 100, 70_000)]
    opt = SPAM(params, compiled=True)
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[-1] = float("nan")
    before = [p.detach().clone() for p in params]
    opt.step()
    assert calls == [3]
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.state[params[0]]["skipped_steps"] == 1


_PROBE = """
import sys, torch
from spamopt.optim import native
assert native.library() is not None
print(native.library()._name)
"""


def _build_in_fresh_process(cache: str) -> str:
    env = {**os.environ, "SPAMOPT_CACHE_DIR": cache}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_build_is_cached_and_shared_between_processes(tmp_path):
    """A first process builds the library into ``SPAMOPT_CACHE_DIR``; a second loads that file without building
    (its time stamp is unchanged), and no partial file is left behind."""
    first = _build_in_fresh_process(str(tmp_path))
    stamp = os.stat(first).st_mtime_ns
    assert _build_in_fresh_process(str(tmp_path)) == first
    assert os.stat(first).st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first)]


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    """A compiler that fails: one warning naming the problem, ``available()`` False, and SPAM's compiled step
    still runs (on the torch.compile kernels) with the finite check on aminmax."""
    monkeypatch.setenv("SPAMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: "false")  # /bin/false: exits 1, writes nothing
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build its native CPU loops"):
            assert not native.available()
        param = torch.nn.Parameter(torch.randn(32))
        param.grad = torch.randn(32)
        SPAM([param], compiled=True).step()
        assert list(tmp_path.iterdir()) == []
    finally:
        native.library.cache_clear()


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    """``SPAMOPT_CACHE_DIR`` that cannot be created (under a file) gives way to the next candidates."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPAMOPT_CACHE_DIR", str(blocker / "cache"))
    assert native._cache_dir() != blocker / "cache"
    assert os.access(native._cache_dir(), os.W_OK)


def test_spam_takes_the_compiled_step_by_default_where_the_native_loops_step_the_whole_group(native_off):
    """On the CPU a dense float32 or float64 group of any size defaults to the compiled step when the native
    loops run (they cost no torch.compile time); a sparse group, a bfloat16 one, an explicit flag
    or ``SPAMOPT_NATIVE=0`` keep the for-loop below ``compile_min_numel``; Stable-SPAM's float32 groups
    default to it too, except with ``reference_compat``."""
    def chosen(opt):
        return {opt._implementation(g, g["params"]) for g in opt.param_groups}

    small = [torch.nn.Parameter(torch.randn(10, 10)), torch.nn.Parameter(torch.randn(10))]
    assert chosen(SPAM(small)) == {"compiled"}
    assert chosen(SPAM([p.detach().double().requires_grad_() for p in small])) == {"compiled"}
    assert chosen(SPAM(small, density=0.5)) == {"forloop"}
    assert chosen(SPAM([torch.nn.Parameter(torch.randn(10, dtype=torch.bfloat16))])) == {"forloop"}
    assert chosen(SPAM(small, foreach=True)) == {"foreach"}
    assert chosen(SPAM(small, compiled=False)) == {"forloop"}
    assert chosen(StableSPAM(small)) == {"compiled"}
    assert chosen(StableSPAM(small, reference_compat=True)) == {"forloop"}
    native_off(False)
    assert chosen(SPAM(small)) == {"forloop"}
    assert chosen(StableSPAM(small)) == {"forloop"}


def _assert_same_stable(a, b, exact: bool) -> None:
    (params_a, opt_a), (params_b, opt_b) = a, b
    for pa, pb in zip(params_a, params_b):
        pairs = [(pa, pb, 1e-6)] + [(opt_a.state[pa][k], opt_b.state[pb][k], 1e-9) for k in opt_a.state[pa]]
        for x, y, atol in pairs:  # not exact: the for-loop comparison's tolerances (parameters, states)
            if exact:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("overrides", [{"adagn": False}, {"adagn": False, "adaclip": "clamp"},
                                       {"adagn": False, "adaclip": "off"}, {"adagn": False, "skip_nonfinite": False},
                                       {"adagn": False, "maximize": True}, {"adagn": False, "total_steps": 8,
                                                                            "eta_min": 0.3}])
def test_stable_spam_native_without_adagn_gives_the_torch_compile_kernels_bits(native_off, overrides):
    """Stable-SPAM's stress set (resets, a skipped NaN step, σ schedule; max|g| read from the check or found by
    the loop) without AdaGN: parameters, moments, AdaClip's statistic and counters bit for bit the
    torch.compile kernel's."""
    native_off(False)
    reference = _stable_run({"compiled": True}, torch.float32, **overrides)
    native_off(True)
    _assert_same_stable(_stable_run({"compiled": True}, torch.float32, **overrides), reference, exact=True)


@pytest.mark.parametrize("overrides", [{}, {"adaclip": "clamp"}, {"adaclip": "off"}, {"skip_nonfinite": False},
                                       {"maximize": True}])
def test_stable_spam_native_with_adagn_agrees_with_the_for_loop(native_off, overrides):
    """With AdaGN (whose norm the loop sums in float64): parameters within the compiled step's tolerance of
    the for-loop's, states to 1e-5, counters exactly, and the torch.compile kernel's results to 1e-5 too."""
    reference = _stable_run({"foreach": False}, torch.float32, **overrides)
    run = _stable_run({"compiled": True}, torch.float32, **overrides)
    for ref, got in zip(reference[0], run[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        for key, value in reference[1].state[ref].items():
            if key in ("step", "stat_step", "global_step", "skipped_steps"):
                assert torch.equal(run[1].state[got][key], value), key
            else:
                torch.testing.assert_close(run[1].state[got][key], value, rtol=1e-5, atol=1e-9)
    native_off(False)
    _assert_same_stable(run, _stable_run({"compiled": True}, torch.float32, **overrides), exact=False)


def _run_large_stable(threads: int, **options) -> tuple[list[torch.Tensor], StableSPAM]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = _large(torch.float32)
        opt = StableSPAM(params, compiled=True, lr=1e-2, **options)
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
                if step == 2:
                    p.grad[:: max(1, p.numel() // 7)] *= 1e3
            opt.step()
        return params, opt
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("adagn", [False, True])
def test_stable_spam_tensors_split_across_threads(native_off, adagn):
    """Tensors from 1 to 3·2^16 + 5 elements on two threads and on one: without AdaGN the torch.compile
    kernel's bits on both; with it (per-thread partial sums of squares) within 1e-5 of the kernel's."""
    native_off(False)
    reference = _run_large_stable(2, adagn=adagn)
    native_off(True)
    for threads in (2, 1):
        _assert_same_stable(_run_large_stable(threads, adagn=adagn), reference, exact=not adagn)


def test_stable_spam_compiled_steps_a_group_in_one_native_call(monkeypatch):
    """``StableSPAM(compiled=True)`` sends a group's float32 tensors to the native loop in one call and its
    bfloat16 ones to the torch.compile kernel."""
    calls, kernel_calls = [], []
    update, kernel = native.stable_spam_update, compiled.stable_spam_kernel
    monkeypatch.setattr(native, "stable_spam_update", lambda params, *a, **k: calls.append(len(params)) or update(
        params, *a, **k))
    monkeypatch.setattr(compiled, "stable_spam_kernel", lambda *a, **k: kernel_calls.append(a) or kernel(*a, **k))
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(4)]
    params.append(torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16)))
    opt = StableSPAM(params, compiled=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert calls == [4] and len(kernel_calls) == 1
