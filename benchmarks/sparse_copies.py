"""Sparse momentum's copies between a matrix and its compact buffers: boolean-mask copies against indexed ones.

A sparse SPAM step moves each matrix's kept coordinates out (parameter and gradient) and back (parameter).
With a boolean mask, each of those three copies (``masked_select``, ``masked_scatter_``) finds the kept
positions again; with :func:`spamopt.optim.sparse.kept_index` they are found once per tensor and the copies are
indexed (``index_select``, ``index_copy_``). Both variants step the same LLaMA-shaped parameters (the paper's
grouping: attention and MLP matrices at density 0.25, the rest dense) in one process, interleaved, with torch's
fused AdamW alongside for scale; the boolean variant is the library's functions replaced by the mask-based
ones for its turn. Writes JSON.

    python benchmarks/sparse_copies.py --threads 2        # LLaMA-60M shapes, foreach and compiled
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from spamopt import SPAM
from spamopt.experiments.lm.config import CONFIGS, is_block_matrix
from spamopt.optim import sparse


@contextmanager
def boolean_mask_copies():
    """The copies as they were before ``kept_index``: the unpacked mask, and a boolean-mask copy each time."""
    saved = sparse.kept_index, sparse.gather, sparse.scatter_
    sparse.kept_index = sparse.unpack_mask
    sparse.gather = lambda tensor, mask: tensor.masked_select(mask.view(tensor.shape))
    sparse.scatter_ = lambda tensor, mask, values: tensor.masked_scatter_(mask.view(tensor.shape), values)
    try:
        yield
    finally:
        sparse.kept_index, sparse.gather, sparse.scatter_ = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="60m", choices=sorted(CONFIGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/sparse_copies.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    named = []
    for name, shape in CONFIGS[args.model].parameter_shapes().items():
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02))
        p.grad = torch.randn(shape, generator=generator).mul_(1e-3)
        named.append((name, p))
    params = [p for _, p in named]
    groups = [{"params": [p for n, p in named if is_block_matrix(n, p.shape)], "density": 0.25},
              {"params": [p for n, p in named if not is_block_matrix(n, p.shape)]}]
    optimizers = {"adamw_fused": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)}
    for implementation in ("foreach", "compiled"):
        flags = {"foreach": implementation == "foreach", "compiled": implementation == "compiled"}
        for copies in ("indexed", "boolean"):
            optimizers[f"spam_sparse25_{implementation}_{copies}"] = SPAM(groups, lr=1e-3, clip_delay=0, **flags)
    times: dict[str, list[float]] = {name: [] for name in optimizers}

    def step(name: str) -> float:
        with boolean_mask_copies() if name.endswith("boolean") else contextmanager(lambda: (yield))():
            start = time.perf_counter()
            optimizers[name].step()
            return time.perf_counter() - start

    for name in optimizers:  # warm-up: state creation and compilation
        step(name), step(name)
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load touches every row alike
        for name in optimizers:
            times[name].append(step(name))
    median = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    rows = {name: {"ms_per_step": ms, "vs_adamw_fused": ms / median["adamw_fused"]} for name, ms in median.items()}
    for implementation in ("foreach", "compiled"):
        base = f"spam_sparse25_{implementation}"
        rows[f"{base}_indexed"]["speedup_vs_boolean"] = median[f"{base}_boolean"] / median[f"{base}_indexed"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "threads": args.threads, "repeats": args.repeats,
                                    "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print("| implementation | ms/step | vs AdamW fused | indexed vs boolean |\n| --- | ---: | ---: | ---: |")
    for name, row in rows.items():
        speedup = f"{row['speedup_vs_boolean']:.2f}x" if "speedup_vs_boolean" in row else ""
        print(f"| {name} | {row['ms_per_step']:.1f} | {row['vs_adamw_fused']:.2f} | {speedup} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
