"""CPU loops over a whole group of tensors in one call: ``native_loops.c``, built with the system's C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``) on first use, cached on disk, called through ``ctypes``.

Three loops live there. SPAM's dense update takes every float32 (or float64) tensor of a group at once,
where the ``torch.compile`` kernel (:mod:`.compiled`) is one call per tensor, about 75 µs of Python, guards
and wrappers each; the loop does the same operations in the same order and precision (no fused
multiply-add, IEEE square roots and divisions), so the two give the same bits, and ``compiled=True`` uses
it wherever it applies. Stable-SPAM's step likewise, except that AdaGN's sum of squares is taken in float64
(the kernel's float32 sum has an order of its own), so with AdaGN the results agree to rounding. The
non-finite check finds every tensor's max|g| in one multi-threaded pass instead of one ``aminmax`` per
tensor.

The library is built once per source, compiler, flags and CPU (``-march=native``) into
``$SPAMOPT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/spamopt``, else ``~/.cache/spamopt``, else a folder in the
temporary directory), written to a temporary file and renamed, so concurrent processes never load a partial
one. Without a compiler or OpenMP, or with ``SPAMOPT_NATIVE=0``, nothing here is used: the callers keep their
``torch.compile`` kernels and ``aminmax`` (a failed build says why, once, as a warning).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "eligible", "spam_update", "stable_spam_update", "finite_peaks", "SUPPORTED_DTYPES"]

SOURCE = Path(__file__).with_name("native_loops.c")
SUPPORTED_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
#: Below this many elements a tensor goes whole to one thread (the torch.compile kernels' line, too).
PARALLEL_MIN_NUMEL = 1 << 16
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    """The first of ``$SPAMOPT_CACHE_DIR``, ``$XDG_CACHE_HOME/spamopt``, ``~/.cache/spamopt`` that can be
    created and written, else ``spamopt-<user>`` in the temporary directory."""
    candidates = [os.environ.get("SPAMOPT_CACHE_DIR")]
    candidates.append(os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spamopt"))
    for candidate in candidates:
        if candidate:
            try:
                Path(candidate).mkdir(parents=True, exist_ok=True)
                if os.access(candidate, os.W_OK):
                    return Path(candidate)
            except OSError:
                pass
    uid = os.getuid() if hasattr(os, "getuid") else None
    fallback = Path(tempfile.gettempdir()) / f"spamopt-{uid if uid is not None else 'user'}"
    fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    if uid is not None and fallback.stat().st_uid != uid:  # someone else's folder: never load a library from it
        return Path(tempfile.mkdtemp(prefix="spamopt-"))
    return fallback


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags where Linux lists them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _build(compiler: str, target: Path, flags: list[str]) -> str | None:
    """Compile ``SOURCE`` to ``target`` through a temporary file renamed into place; the compiler's complaint
    on failure, None on success."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".so.part")
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", temporary], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            return (result.stderr or result.stdout).strip()[-2000:] or f"exit status {result.returncode}"
        os.replace(temporary, target)
        return None
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library, loaded (building it first when the cache lacks it), or None where it cannot be
    built."""
    compiler = _compiler()
    if compiler is None:
        return None
    attempts = [[*_FLAGS, "-march=native"], _FLAGS]  # some compilers lack -march=native
    complaint = "no build attempted"
    # What the library depends on besides its flags: one build per source, compiler and CPU.
    build = [SOURCE.read_text(), compiler, subprocess.run([compiler, "--version"], capture_output=True,
                                                         text=True).stdout, platform.machine(), _cpu_signature()]
    cache = _cache_dir()
    for flags in attempts:
        key = hashlib.sha256("\0".join([*build, " ".join(flags)]).encode()).hexdigest()[:20]
        target = cache / f"native_loops-{key}.so"
        if not target.exists():
            failure = _build(compiler, target, flags)
            if failure is not None:
                complaint = failure
                continue
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as error:
            complaint = str(error)
            continue
        pointer, count = ctypes.c_void_p, ctypes.c_int64
        for suffix in SUPPORTED_DTYPES.values():
            stable = getattr(lib, f"stable_spam_update_{suffix}")
            stable.argtypes = [count] + [pointer] * 10 + [ctypes.c_int] * 4 + [count]
            stable.restype = ctypes.c_int
            update = getattr(lib, f"spam_update_{suffix}")
            update.argtypes = [count] + [pointer] * 8 + [ctypes.c_int, count]
            update.restype = None
            peaks = getattr(lib, f"finite_peaks_{suffix}")
            peaks.argtypes = [count, pointer, pointer, pointer, ctypes.c_int, count]
            peaks.restype = ctypes.c_int
        return lib
    warnings.warn(f"spamopt: could not build its native CPU loops with {compiler}, so SPAM and Stable-SPAM step "
                  f"on their other implementations (set SPAMOPT_NATIVE=0 to skip the attempt): {complaint}",
                  RuntimeWarning, stacklevel=2)
    return None


def available() -> bool:
    """The loops can run here: ``SPAMOPT_NATIVE`` is not ``0`` and the library builds."""
    return os.environ.get("SPAMOPT_NATIVE", "1") != "0" and library() is not None


def eligible(*tensors: Tensor) -> bool:
    """These tensors can go through the loops: non-empty, contiguous, on the CPU, all of one supported
    dtype."""
    first = tensors[0]
    return first.dtype in SUPPORTED_DTYPES and all(
        t.device.type == "cpu" and t.dtype == first.dtype and t.is_contiguous() and t.numel() == first.numel() > 0
        for t in tensors)


def _pointers(tensors: list[Tensor]) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def spam_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                step_sizes: Tensor, scalars: Tensor, counting: bool = False) -> Tensor | None:
    """SPAM's dense update in place on every ``(param, grad, exp_avg, exp_avg_sq)`` (each quadruple
    :func:`eligible`, all of one dtype), in one call: :func:`spamopt.optim.compiled._update` states the math
    and ``scalars`` (float64, the same eight values); ``step_sizes`` holds one float64 step size per tensor.
    Returns the clipped coordinates per tensor (int64) when ``counting``."""
    lib = library()
    assert lib is not None, "spam_update needs available()"
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    counts = torch.zeros(len(params), dtype=torch.int64) if counting else None
    steps = step_sizes.to(torch.float64).contiguous()
    values = scalars.to(torch.float64).contiguous()
    held = [_pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs)]
    getattr(lib, f"spam_update_{SUPPORTED_DTYPES[params[0].dtype]}")(
        len(params), *(h.data_ptr() for h in held), numels.data_ptr(), steps.data_ptr(), values.data_ptr(),
        None if counts is None else counts.data_ptr(), torch.get_num_threads(), PARALLEL_MIN_NUMEL)
    return counts


ADACLIP_MODES = {"off": 0, "scale": 1, "clamp": 2}


def stable_spam_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                       statistics: list[dict[str, Tensor]], scalars: Tensor, corrections: Tensor, *, adaclip: str,
                       adagn: bool, peak_given: bool) -> None:
    """Stable-SPAM's step in place on every ``(param, grad, exp_avg, exp_avg_sq)`` (each :func:`eligible`, all of
    one dtype) and on each one's float64 statistics ``max_ema``, ``norm_ema``, ``norm_sq_ema``, in one call:
    :func:`spamopt.optim.compiled._stable_update` states the math, ``scalars`` (ten float64 values) and
    ``corrections`` (one row of six float64 per tensor) are its arguments. AdaGN's sum of squares is taken in
    float64, so with AdaGN on the result agrees with the torch.compile kernel's to rounding, not bit for bit."""
    lib = library()
    assert lib is not None, "stable_spam_update needs available()"
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    held = [_pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs)]
    held += [_pointers([s[key] for s in statistics]) for key in ("max_ema", "norm_ema", "norm_sq_ema")]
    values = scalars.to(torch.float64).contiguous()
    rows = corrections.to(torch.float64).contiguous()
    status = getattr(lib, f"stable_spam_update_{SUPPORTED_DTYPES[params[0].dtype]}")(
        len(params), *(h.data_ptr() for h in held), numels.data_ptr(), values.data_ptr(), rows.data_ptr(),
        ADACLIP_MODES[adaclip], int(adagn), int(peak_given), torch.get_num_threads(), PARALLEL_MIN_NUMEL)
    if status != 0:
        raise MemoryError("spamopt's native Stable-SPAM step could not allocate its per-tensor scratch")


def finite_peaks(grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(all finite, peaks)``: a 0-dim bool and each gradient's max|g| (in their dtype, NaN for a gradient
    holding NaN or ±Inf), from one multi-threaded pass; every gradient :func:`eligible`, all of one dtype."""
    lib = library()
    assert lib is not None, "finite_peaks needs available()"
    peaks = torch.empty(len(grads), dtype=grads[0].dtype)
    pointers = _pointers(grads)
    numels = torch.tensor([g.numel() for g in grads], dtype=torch.int64)
    finite = getattr(lib, f"finite_peaks_{SUPPORTED_DTYPES[grads[0].dtype]}")(
        len(grads), pointers.data_ptr(), numels.data_ptr(), peaks.data_ptr(), torch.get_num_threads(),
        PARALLEL_MIN_NUMEL)
    if finite < 0:
        raise MemoryError("spamopt's native finite check could not allocate its per-thread maxima")
    return torch.tensor(bool(finite)), peaks
