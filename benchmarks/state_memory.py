"""Optimizer-state bytes of SPAM on the paper's LLaMA shapes: dense, density 0.25 on attention and MLP
matrices (the paper's grouping), and density 0.25 on every matrix (embedding and head included); beside them
torch's AdamW and StableSPAM (Adam's state plus a few scalars per tensor); and the memory-matched comparison
(``--galore``) as the registry builds it for ``spamopt compare``: AdamW, Adam-mini, galore-torch's GaLoreAdamW at
the paper's rank on the attention and MLP matrices (projector included, with the SVD factor it slices), and
sparse SPAM at the densities matched to GaLore's nominal state (the paper's) and to the memory it holds
(``--match-memory galore:R`` / ``galore-held:R``), and at 0.25. Every figure comes from the real optimizers' state.

State is device-independent, so this runs on the CPU: each parameter is stepped once by its own optimizer
instance and the bytes of the state it creates (moments, bitmasks, projectors, counters) are summed, then
freed. fp32 parameters.

    python benchmarks/state_memory.py --models 60m 350m 1b     # writes results/state_memory.json
    python benchmarks/state_memory.py --models 60m 130m 350m 1b --galore --out results/state_memory_matched.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spamopt import SPAM, StableSPAM
from spamopt.experiments.harness.optimizers import build_optimizer, state_bytes
from spamopt.experiments.lm.compare import matched_memory
from spamopt.experiments.lm.config import CONFIGS, is_block_matrix, optimizer_layout

PAPER_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}  # GaLore's ranks in the SPAM paper


def _variants(name: str, shape: tuple[int, ...]) -> dict[str, float]:
    matrix = len(shape) == 2
    block = is_block_matrix(name, shape)
    return {"dense": 1.0, "sparse25_blocks": 0.25 if block else 1.0, "sparse25_all_matrices": 0.25 if matrix else 1.0}


def _bytes(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> int:
    """Bytes of the state one step creates, tensors one attribute deep included (GaLore's projector)."""
    opt.step()
    return state_bytes(opt)


def _holding(name: str, param: torch.nn.Parameter) -> torch.nn.Module:
    """A module whose only parameter is ``param`` under its full dotted ``name`` (the registry's builders and
    Adam-mini's partition read names)."""
    root = module = torch.nn.Module()
    *path, leaf = name.split(".")
    for part in path:
        module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
    module.register_parameter(leaf, param)
    return root


def matched_state_bytes(model: str) -> dict[str, int | float]:
    """The memory-matched comparison's optimizers through the registry, as ``spamopt compare`` builds them:
    AdamW, Adam-mini, GaLore at the paper's rank and sparse SPAM at the matched density and at 0.25 (the
    last three on the block matrices, Adam-like state elsewhere). Each parameter is stepped alone."""
    rank = PAPER_RANKS[model]
    config = CONFIGS[model]
    layout = optimizer_layout(config)
    density = matched_memory(f"galore:{rank}", model)["density"]  # what `spamopt compare --match-memory` picks
    held = matched_memory(f"galore-held:{rank}", model)["density"]
    setups = {"adamw": ("adamw", {}), "adam_mini": ("adam-mini", {}), "galore": ("galore", {"rank": rank}),
              "spam_sparse_matched": ("spam-sparse", {"density": density}),
              "spam_sparse_held_matched": ("spam-sparse", {"density": held}),
              "spam_sparse_0.25": ("spam-sparse", {"density": 0.25})}
    totals: dict[str, int | float] = {key: 0 for key in setups} | {"rank": rank, "density": density,
                                                                   "held_density": held}
    for name, shape in config.parameter_shapes().items():
        param = torch.nn.Parameter(torch.zeros(shape))
        param.grad = torch.randn(shape)
        holder = _holding(name, param)
        for key, (registry_name, options) in setups.items():
            setup = build_optimizer(registry_name, holder, layout, lr=1e-3, options=options)
            totals[key] += _bytes(setup.optimizer, param)
    return totals


def spam_state_bytes(model: str) -> dict[str, int]:
    totals = {"dense": 0, "sparse25_blocks": 0, "sparse25_all_matrices": 0, "adamw": 0, "stable_spam": 0}
    for name, shape in CONFIGS[model].parameter_shapes().items():
        param = torch.nn.Parameter(torch.zeros(shape))
        param.grad = torch.zeros(shape)
        for variant, density in _variants(name, shape).items():
            totals[variant] += _bytes(SPAM([param], density=density), param)
        totals["adamw"] += _bytes(torch.optim.AdamW([param]), param)
        totals["stable_spam"] += _bytes(StableSPAM([param]), param)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["60m", "350m", "1b"], choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path("results/state_memory.json"))
    parser.add_argument("--galore", action="store_true", help="the memory-matched GaLore / sparse-SPAM pair")
    args = parser.parse_args()
    report = {}
    for model in args.models:
        if args.galore:
            report[model] = matched_state_bytes(model)
            print(model, {k: v if k in ("rank", "density", "held_density") else f"{v / 2**20:,.1f} MiB"
                          for k, v in report[model].items()})
            continue
        totals = spam_state_bytes(model)
        report[model] = {variant: {"bytes": b, "vs_dense": b / totals["dense"]} for variant, b in totals.items()}
        print(model, {variant: f"{row['bytes'] / 2**20:,.1f} MiB ({row['vs_dense']:.3f}x)"
                      for variant, row in report[model].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
