"""Optimizer-state bytes of SPAM on the paper's LLaMA shapes: dense, density 0.25 on attention and MLP
matrices (the paper's grouping), and density 0.25 on every matrix (embedding and head included); beside them
torch's AdamW and StableSPAM (Adam's state plus a few scalars per tensor).

State is device-independent, so this runs on the CPU: each parameter is stepped once by its own SPAM instance
and the bytes of the state it creates (moments, bitmask, counters) are summed, then freed. fp32 parameters.

    python benchmarks/state_memory.py --models 60m 350m 1b     # writes results/state_memory.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spamopt import SPAM, StableSPAM
from spamopt.experiments.lm.config import CONFIGS, is_block_matrix


def _variants(name: str, shape: tuple[int, ...]) -> dict[str, float]:
    matrix = len(shape) == 2
    block = is_block_matrix(name, shape)
    return {"dense": 1.0, "sparse25_blocks": 0.25 if block else 1.0, "sparse25_all_matrices": 0.25 if matrix else 1.0}


def _bytes(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> int:
    opt.step()
    return sum(t.numel() * t.element_size() for t in opt.state[param].values() if isinstance(t, torch.Tensor))


def state_bytes(model: str) -> dict[str, int]:
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
    args = parser.parse_args()
    report = {}
    for model in args.models:
        totals = state_bytes(model)
        report[model] = {variant: {"bytes": b, "vs_dense": b / totals["dense"]} for variant, b in totals.items()}
        print(model, {variant: f"{row['bytes'] / 2**20:,.1f} MiB ({row['vs_dense']:.3f}x)"
                      for variant, row in report[model].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
