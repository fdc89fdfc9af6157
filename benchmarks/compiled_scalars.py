"""The compiled steps with their per-tensor scalars computed once, against the same kernels with those scalars
recomputed in every vector iteration (inductor's default), beside torch's fused AdamW, in one process.

Inductor inlines a cheap computation into each loop that reads it. For Stable-SPAM's kernel that put AdaClip's
bound, AdaGN's power-of-two scale (``frexp``, ``ldexp``) and its debiased norm ratio (square roots and
float64 divisions) inside the loops over the coordinates: tens of scalar operations per 16 coordinates. The
kernels are now compiled with ``realize_opcount_threshold=1``, which stores such values once and loads them
in the loops. The inlined variant is the same kernel compiled with inductor's default, swapped in for its
turn. LLaMA-60M shapes, interleaved steps, medians; writes JSON.

    python benchmarks/compiled_scalars.py --threads 2
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from spamopt import SPAM, StableSPAM
from spamopt.optim import compiled

from side_by_side import arguments, interleaved_medians, llama_parameters, report


# Own functions (so own compile caches) around the library's kernel bodies.
def _spam_inlined(*args: Tensor) -> None:
    compiled._update(*args, count=False)


def _spam_counting_inlined(*args: Tensor) -> Tensor | None:
    return compiled._update(*args, count=True)


def _stable_inlined(adaclip: str, adagn: bool, peak_given: bool, *args: Tensor) -> None:
    compiled._stable_update(*args, adaclip=adaclip, adagn=adagn, peak_given=peak_given)


def _inlined_options(threaded: bool) -> dict:
    return {k: v for k, v in compiled._OPTIONS[threaded].items() if k != "realize_opcount_threshold"}


@functools.cache
def _inlined_spam_kernel(count: bool, threaded: bool = True):
    return torch.compile(_spam_counting_inlined if count else _spam_inlined, dynamic=True, fullgraph=True,
                         options=_inlined_options(threaded))


@functools.cache
def _inlined_stable_kernel(adaclip: str, adagn: bool, threaded: bool = True, peak_given: bool = False):
    return torch.compile(functools.partial(_stable_inlined, adaclip, adagn, peak_given), dynamic=True, fullgraph=True,
                         options=_inlined_options(threaded))


@contextmanager
def inlined_scalars():
    saved = compiled.spam_kernel, compiled.stable_spam_kernel
    compiled.spam_kernel, compiled.stable_spam_kernel = _inlined_spam_kernel, _inlined_stable_kernel
    try:
        yield
    finally:
        compiled.spam_kernel, compiled.stable_spam_kernel = saved


def main() -> None:
    args = arguments(__doc__, "results/compiled_scalars.json", repeats=7)
    params = [p for _, p in llama_parameters(args.model)]
    optimizers = {
        "adamw_fused": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True),
        "spam_compiled": SPAM(params, lr=1e-3, compiled=True, clip_delay=0),
        "spam_compiled_inlined": SPAM(params, lr=1e-3, compiled=True, clip_delay=0),
        "stable_spam_compiled": StableSPAM(params, lr=1e-3, compiled=True),
        "stable_spam_compiled_inlined": StableSPAM(params, lr=1e-3, compiled=True),
    }
    median = interleaved_medians(
        optimizers, lambda name: inlined_scalars() if name.endswith("inlined") else nullcontext(), args.repeats)
    pairs = {base: f"{base}_inlined" for base in ("spam_compiled", "stable_spam_compiled")}
    report(median, "adamw_fused", pairs, "scalars once vs inlined", args.out,
           {"model": args.model, "threads": args.threads, "repeats": args.repeats})


if __name__ == "__main__":
    main()
