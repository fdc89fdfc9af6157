"""Optimizer-step time of SPAM against torch.optim.AdamW on LLaMA-shaped parameter sets.

Every implementation steps the same parameters and gradients in one process, side by side; the table
reports milliseconds per step and the ratio to torch's fused AdamW (and its foreach path). Writes JSON.

    python benchmarks/step_speed.py                              # CPU, LLaMA-60M shapes
    python benchmarks/step_speed.py --device cuda --models 350m 1b
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from spamopt import SPAM
from spamopt.experiments.lm.config import CONFIGS

SPARSE_MODULES = ("attn.", "mlp.")  # the reference puts attention and MLP matrices in the density group


def _params(model: str, device: str) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    named = []
    for name, shape in CONFIGS[model].parameter_shapes().items():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02).to(device))
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3).to(device)
        named.append((name, p))
    return named


def _candidates(named):
    params = [p for _, p in named]
    sparse = [p for n, p in named if p.dim() == 2 and any(m in n for m in SPARSE_MODULES)]
    dense = [p for n, p in named if not (p.dim() == 2 and any(m in n for m in SPARSE_MODULES))]
    sparse_groups = [{"params": sparse, "density": 0.25}, {"params": dense}]
    return {
        "adamw_foreach": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True),
        "adamw_fused": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True),
        "spam_forloop": lambda: SPAM(params, lr=1e-3, foreach=False, clip_delay=0),
        "spam_foreach": lambda: SPAM(params, lr=1e-3, foreach=True, clip_delay=0),
        "spam_sparse25_foreach": lambda: SPAM(sparse_groups, lr=1e-3, foreach=True, clip_delay=0),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def measure(model: str, device: str, repeats: int, warmup: int) -> dict:
    named = _params(model, device)
    numel = sum(p.numel() for _, p in named)
    snapshot = [p.detach().clone() for _, p in named]
    rows = {}
    for name, make in _candidates(named).items():
        for (_, p), s in zip(named, snapshot):
            p.data.copy_(s)
        opt = make()
        for _ in range(warmup):
            opt.step()
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - start)
        row = {"ms_per_step": 1e3 * statistics.median(times), "state_bytes": _state_bytes(opt)}
        if device == "cuda":
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        rows[name] = row
        del opt
    for row in rows.values():
        row["vs_adamw_fused"] = row["ms_per_step"] / rows["adamw_fused"]["ms_per_step"]
        row["vs_adamw_foreach"] = row["ms_per_step"] / rows["adamw_foreach"]["ms_per_step"]
    return {"model": model, "parameters": numel, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["60m"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/step_speed.json"))
    args = parser.parse_args()

    if args.device == "cpu":
        device_name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    else:
        device_name = torch.cuda.get_device_name()
    report = {"device": device_name, "torch": torch.__version__, "runs": []}
    for model in args.models:
        run = measure(model, args.device, args.repeats, args.warmup)
        report["runs"].append(run)
        print(f"\nLLaMA-{model} shapes, {run['parameters'] / 1e6:.1f}M parameters, {device_name}")
        print(f"{'implementation':<24}{'ms/step':>10}{'vs fused':>10}{'vs foreach':>12}{'state MiB':>11}")
        for name, row in run["results"].items():
            print(f"{name:<24}{row['ms_per_step']:>10.1f}{row['vs_adamw_fused']:>10.2f}"
                  f"{row['vs_adamw_foreach']:>12.2f}{row['state_bytes'] / 2**20:>11.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
