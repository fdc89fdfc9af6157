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

from contextlib import contextmanager, nullcontext

import torch

from spamopt import SPAM
from spamopt.experiments.lm.config import is_block_matrix
from spamopt.optim import sparse

from side_by_side import arguments, interleaved_medians, llama_parameters, report


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
    args = arguments(__doc__, "results/sparse_copies.json", repeats=5)
    named = llama_parameters(args.model)
    params = [p for _, p in named]
    groups = [{"params": [p for n, p in named if is_block_matrix(n, p.shape)], "density": 0.25},
              {"params": [p for n, p in named if not is_block_matrix(n, p.shape)]}]
    optimizers = {"adamw_fused": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)}
    for implementation in ("foreach", "compiled"):
        flags = {"foreach": implementation == "foreach", "compiled": implementation == "compiled"}
        for copies in ("indexed", "boolean"):
            optimizers[f"spam_sparse25_{implementation}_{copies}"] = SPAM(groups, lr=1e-3, clip_delay=0, **flags)
    median = interleaved_medians(
        optimizers, lambda name: boolean_mask_copies() if name.endswith("boolean") else nullcontext(), args.repeats)
    pairs = {f"spam_sparse25_{i}_indexed": f"spam_sparse25_{i}_boolean" for i in ("foreach", "compiled")}
    report(median, "adamw_fused", pairs, "indexed vs boolean", args.out,
           {"model": args.model, "threads": args.threads, "repeats": args.repeats})


if __name__ == "__main__":
    main()
