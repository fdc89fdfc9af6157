"""Sparse momentum's copies between a matrix and its compact buffers, and the compiled loop that needs none.

A sparse SPAM step moves each matrix's kept coordinates out (parameter and gradient) and back (parameter).
Foreach: with a boolean mask each of those three copies (``masked_select``, ``masked_scatter_``) finds the kept
positions again; with :func:`spamopt.optim.sparse.kept_index` they are found once per tensor and the copies are
indexed (``index_select``, ``index_copy_``). Compiled: the loop reads and writes the kept coordinates itself
(``in_loop``) where it once ran on gathered copies scattered back (``copies``: the library's kernel wrapped in
those copies for its turn), and ``keep_positions=True`` (``positions``) keeps the positions between steps
instead of searching the bitmask every step; ``torch_search`` finds the positions with torch instead of numpy
(as without numpy installed). Every variant steps the same LLaMA-shaped parameters (the paper's
grouping: attention and MLP matrices at density 0.25, the rest dense) in one process, interleaved, with torch's
fused AdamW alongside for scale. Writes JSON.

    python benchmarks/sparse_copies.py --threads 2        # LLaMA-60M shapes
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from spamopt import SPAM
from spamopt.experiments.lm.config import is_block_matrix
from spamopt.optim import compiled, sparse

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


@contextmanager
def compiled_on_copies():
    """The compiled sparse step as it was: the kernel run on gathered copies of the kept coordinates, the
    parameter's scattered back (what the kernel's loop now does with indexed loads and stores)."""
    kernel = compiled.spam_kernel

    def on_copies(count: bool, threaded: bool = True):
        inner = kernel(count, threaded)

        def call(param, grad, exp_avg, exp_avg_sq, step_size, scalars, kept=None):
            if kept is None:
                return inner(param, grad, exp_avg, exp_avg_sq, step_size, scalars)
            kept = kept.long()
            work = sparse.gather(param, kept)
            clipped = inner(work, sparse.gather(grad, kept), exp_avg, exp_avg_sq, step_size, scalars)
            sparse.scatter_(param, kept, work)
            return clipped

        return call

    compiled.spam_kernel = on_copies
    try:
        yield
    finally:
        compiled.spam_kernel = kernel


@contextmanager
def torch_search():
    """Kept positions found by torch (unpack, ``nonzero``) instead of numpy, as without numpy installed."""
    saved = sparse._numpy
    sparse._numpy = None
    try:
        yield
    finally:
        sparse._numpy = saved


VARIANTS = {
    "foreach_indexed": ({"foreach": True}, nullcontext),
    "foreach_boolean": ({"foreach": True}, boolean_mask_copies),
    "compiled_in_loop": ({"compiled": True}, nullcontext),
    "compiled_positions": ({"compiled": True, "keep_positions": True}, nullcontext),
    "compiled_copies": ({"compiled": True}, compiled_on_copies),
    "compiled_in_loop_torch_search": ({"compiled": True}, torch_search),
}


def main() -> None:
    args = arguments(__doc__, "results/sparse_copies.json", repeats=5)
    named = llama_parameters(args.model)
    params = [p for _, p in named]
    optimizers = {"adamw_fused": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True)}
    for name, (flags, _) in VARIANTS.items():
        # new group dicts each time: torch.optim writes its defaults (the implementation flags) into them
        groups = [{"params": [p for n, p in named if is_block_matrix(n, p.shape)], "density": 0.25},
                  {"params": [p for n, p in named if not is_block_matrix(n, p.shape)]}]
        optimizers[f"spam_sparse25_{name}"] = SPAM(groups, lr=1e-3, clip_delay=0, **flags)
    contexts = {f"spam_sparse25_{name}": context for name, (_, context) in VARIANTS.items()}
    median = interleaved_medians(optimizers, lambda name: contexts.get(name, nullcontext)(), args.repeats)
    pairs = {f"spam_sparse25_{new}": f"spam_sparse25_{old}" for new, old in
             (("foreach_indexed", "foreach_boolean"), ("compiled_in_loop", "compiled_copies"),
              ("compiled_positions", "compiled_in_loop"))}
    report(median, "adamw_fused", pairs, "speed-up over its pair", args.out,
           {"model": args.model, "threads": args.threads, "repeats": args.repeats})


if __name__ == "__main__":
    main()
