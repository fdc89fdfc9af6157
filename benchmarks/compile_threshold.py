"""When SPAM's compiled CPU step repays its compilation: the step SPAM takes by default below
``compile_min_numel`` (the for-loop) against ``compiled=True`` at several LLaMA shapes, and what compiling
costs a fresh process, with torch's on-disk kernel cache empty and warm.

Per shape, in one process with the kernels already built: both steps' ms/step (interleaved, median) and the
saving per step. Then two child processes step the ``--compile-shape`` parameters once with ``compiled=True``:
the first with an empty ``TORCHINDUCTOR_CACHE_DIR`` and ``SPAMOPT_CACHE_DIR`` (cold: what a user's first run
pays), the second with the caches the first left (warm: every later run); a child's compile time is its first
step minus a later one. Where the native CPU loops build, ``compiled=True`` steps these dense float32 groups
on them (``SPAMOPT_NATIVE=0`` measures the torch.compile kernels instead).
A run repays the compilation after compile time / saving steps. Writes JSON; prints a markdown table. ::

    python benchmarks/compile_threshold.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from spamopt import SPAM
from spamopt.experiments.harness.allocator import keep_freed_memory

from side_by_side import interleaved_medians, llama_parameters


def _compile_seconds(shape: str) -> float:
    """In this (fresh) process: the first compiled step's time minus a later step's."""
    params = [p for _, p in llama_parameters(shape)]
    opt = SPAM(params, lr=1e-3, compiled=True, clip_delay=0)
    start = time.perf_counter()
    opt.step()
    first = time.perf_counter() - start
    start = time.perf_counter()
    opt.step()
    return first - (time.perf_counter() - start)


def _child_compile_seconds(shape: str, threads: int, cache: str) -> float:
    command = [sys.executable, __file__, "--child", shape, "--threads", str(threads)]
    # Both caches: torch's kernels and spamopt's native loops (which step SPAM's dense float32 groups).
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "SPAMOPT_CACHE_DIR": cache}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "mini", "small", "60m"])
    parser.add_argument("--compile-shape", default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/compile_threshold.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    if args.child:
        print(_compile_seconds(args.child))
        return
    with tempfile.TemporaryDirectory() as cache:
        cold = _child_compile_seconds(args.compile_shape, args.threads, cache)
        warm = _child_compile_seconds(args.compile_shape, args.threads, cache)
    rows = {}
    for shape in args.shapes:
        named = llama_parameters(shape)
        params = [p for _, p in named]
        optimizers = {"forloop": SPAM(params, lr=1e-3, foreach=False, clip_delay=0),
                      "compiled": SPAM(params, lr=1e-3, compiled=True, clip_delay=0)}
        ms = interleaved_medians(optimizers, lambda name: nullcontext(), args.repeats)
        saving = ms["forloop"] - ms["compiled"]
        rows[shape] = {"parameters": sum(p.numel() for p in params), "forloop_ms": ms["forloop"],
                       "compiled_ms": ms["compiled"], "saving_ms": saving,
                       "steps_to_repay_cold": 1e3 * cold / saving if saving > 0 else None,
                       "steps_to_repay_warm": 1e3 * warm / saving if saving > 0 else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads,
                                    "compile_shape": args.compile_shape, "compile_cold_s": cold,
                                    "compile_warm_s": warm, "rows": rows}, indent=2) + "\n")
    print(f"compile: {cold:.1f} s cold, {warm:.1f} s warm ({args.compile_shape} shapes)\n")
    print("| shapes | parameters | for-loop ms | compiled ms | saved per step | repaid after (cold / warm) |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for shape, row in rows.items():
        repay = ("never" if row["saving_ms"] <= 0 else
                 f"{row['steps_to_repay_cold']:,.0f} / {row['steps_to_repay_warm']:,.0f} steps")
        print(f"| {shape} | {row['parameters'] / 1e6:.2f}M | {row['forloop_ms']:.2f} | {row['compiled_ms']:.2f} | "
              f"{row['saving_ms']:.2f} ms | {repay} |")


if __name__ == "__main__":
    main()
