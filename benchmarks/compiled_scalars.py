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

import argparse
import functools
import json
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import Tensor

from spamopt import SPAM, StableSPAM
from spamopt.experiments.lm.config import CONFIGS
from spamopt.optim import compiled


# Own functions (so own compile caches) around the library's kernel bodies.
def _spam_inlined(*args: Tensor) -> None:
    compiled._update(*args, count=False)


def _spam_counting_inlined(*args: Tensor) -> Tensor | None:
    return compiled._update(*args, count=True)


def _stable_inlined(adaclip: str, adagn: bool, *args: Tensor) -> None:
    compiled._stable_update(*args, adaclip=adaclip, adagn=adagn)


def _inlined_options(threaded: bool) -> dict:
    return {k: v for k, v in compiled._OPTIONS[threaded].items() if k != "realize_opcount_threshold"}


@functools.cache
def _inlined_spam_kernel(count: bool, threaded: bool = True):
    return torch.compile(_spam_counting_inlined if count else _spam_inlined, dynamic=True, fullgraph=True,
                         options=_inlined_options(threaded))


@functools.cache
def _inlined_stable_kernel(adaclip: str, adagn: bool, threaded: bool = True):
    return torch.compile(functools.partial(_stable_inlined, adaclip, adagn), dynamic=True, fullgraph=True,
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="60m", choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("results/compiled_scalars.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in CONFIGS[args.model].parameter_shapes().values():
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02))
        p.grad = torch.randn(shape, generator=generator).mul_(1e-3)
        params.append(p)
    optimizers = {
        "adamw_fused": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True),
        "spam_compiled": SPAM(params, lr=1e-3, compiled=True, clip_delay=0),
        "spam_compiled_inlined": SPAM(params, lr=1e-3, compiled=True, clip_delay=0),
        "stable_spam_compiled": StableSPAM(params, lr=1e-3, compiled=True),
        "stable_spam_compiled_inlined": StableSPAM(params, lr=1e-3, compiled=True),
    }
    times: dict[str, list[float]] = {name: [] for name in optimizers}

    def step(name: str) -> None:
        with inlined_scalars() if name.endswith("inlined") else nullcontext():
            start = time.perf_counter()
            optimizers[name].step()
            times[name].append(time.perf_counter() - start)

    for name in optimizers:  # warm-up: state, compilation
        step(name), step(name)
    for values in times.values():
        values.clear()
    for _ in range(args.repeats):  # interleaved: a change in the machine's load touches every row alike
        for name in optimizers:
            step(name)
    median = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    rows = {name: {"ms_per_step": ms, "vs_adamw_fused": ms / median["adamw_fused"]} for name, ms in median.items()}
    for base in ("spam_compiled", "stable_spam_compiled"):
        rows[base]["speedup_vs_inlined"] = median[f"{base}_inlined"] / median[base]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "threads": args.threads, "repeats": args.repeats,
                                    "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print("| implementation | ms/step | vs AdamW fused | scalars once vs inlined |\n| --- | ---: | ---: | ---: |")
    for name, row in rows.items():
        speedup = f"{row['speedup_vs_inlined']:.2f}x" if "speedup_vs_inlined" in row else ""
        print(f"| {name} | {row['ms_per_step']:.1f} | {row['vs_adamw_fused']:.2f} | {speedup} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
