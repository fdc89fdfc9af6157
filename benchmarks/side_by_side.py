"""Shared by the benchmarks that compare two variants of one optimizer step in one process: interleaved timing
(so that a change in the machine's load touches every row alike) and the JSON + markdown report."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from spamopt.experiments.lm.config import CONFIGS


def arguments(doc: str, out: str, repeats: int) -> argparse.Namespace:
    """``--model`` (LLaMA shapes), ``--threads``, ``--repeats``, ``--out``; sets torch's thread count."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default="60m", choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=Path(out))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def llama_parameters(model: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters of the LLaMA ``model``, seeded, each with a seeded gradient."""
    generator = torch.Generator().manual_seed(0)
    named = []
    for name, shape in CONFIGS[model].parameter_shapes().items():
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02))
        p.grad = torch.randn(shape, generator=generator).mul_(1e-3)
        named.append((name, p))
    return named


def interleaved_medians(optimizers: dict[str, torch.optim.Optimizer],
                        context: Callable[[str], AbstractContextManager], repeats: int) -> dict[str, float]:
    """Milliseconds per ``step()`` of each optimizer, median of ``repeats`` rounds after two warm-up steps (state,
    compilation); ``context(name)`` is entered around each of its steps (a variant's patches)."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}

    def step(name: str) -> float:
        with context(name):
            start = time.perf_counter()
            optimizers[name].step()
            return time.perf_counter() - start

    for name in optimizers:
        step(name), step(name)
    for _ in range(repeats):
        for name in optimizers:
            times[name].append(step(name))
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def report(median: dict[str, float], reference: str, pairs: dict[str, str], column: str, out: Path,
           meta: dict[str, Any]) -> None:
    """Write ``out`` (JSON: ``meta`` and per row its ms/step, the ratio to ``reference`` and, for each ``new:
    old`` pair, the speed-up of new over old) and print the markdown table, ``column`` naming the speed-up."""
    rows = {name: {"ms_per_step": ms, f"vs_{reference}": ms / median[reference]} for name, ms in median.items()}
    for new, old in pairs.items():
        rows[new]["speedup"] = median[old] / median[new]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"| implementation | ms/step | vs {reference} | {column} |\n| --- | ---: | ---: | ---: |")
    for name, row in rows.items():
        speedup = f"{row['speedup']:.2f}x" if "speedup" in row else ""
        print(f"| {name} | {row['ms_per_step']:.1f} | {row[f'vs_{reference}']:.2f} | {speedup} |")
    print(f"wrote {out}")
