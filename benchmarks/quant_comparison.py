"""The papers' low-bit comparison at CPU scale: optimizers × quantisation schemes × learning rates × seeds on
one LLaMA, run as parallel single-thread processes, finished runs reused. Writes, under ``--out-dir``, a
``report.md`` per (scheme, lr) cell (the ``spamopt compare`` report), ``summary-NAME.json`` (final validation
perplexity and loss, mean ± sample std over seeds) and ``summary-NAME.png``. Grids sharing an ``--out-dir`` share
their runs (the sweep below reuses the comparison's lr 3e-3 runs).

    # the 4-bit comparison (SPAM Figure 1 / Stable-SPAM Table 1, scaled down):
    python benchmarks/quant_comparison.py --out-dir runs/quant --quant none,int4,fp4 --seeds 0,1,2 --name comparison
    # the stability claim: final loss against the learning rate under int4
    python benchmarks/quant_comparison.py --out-dir runs/quant --quant int4 --lrs 1e-3,3e-3,1e-2,3e-2 --seeds 0,1 \
        --name lr-sweep

Each optimizer gets the options ``spamopt compare`` gives it by default (SPAM's and Stable-SPAM's schedules
scaled to a 200-step run). The GPU recipe (``--workers 1``; LLaMA-60M; not yet run, as no GPU has been lent):
every finished run is reused, so split the grid by optimizer and seed into commands that each fit a time limit,
and summarise with the full lists at the end:

    python benchmarks/quant_comparison.py --workers 1 --model 60m --data ../shared/data/gutenberg \
        --steps 2000 --seq-len 256 --batch-size 64 --quant none,int4,fp4 --optimizers spam --seeds 0

"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from spamopt.experiments.harness.report import format_mean_std, mean_std
from spamopt.experiments.harness.runner import parse_list, run_jobs
from spamopt.experiments.lm.compare import CompareConfig, write_report
from spamopt.experiments.lm.data import prepare
from spamopt.experiments.lm.train import TrainConfig, train
from spamopt.plotting import pyplot, save


def _cell(out: Path, quant: str, lr: float) -> Path:
    return out / quant / f"lr{lr:g}"


def _jobs(args: argparse.Namespace) -> list[TrainConfig]:
    base = TrainConfig(model=args.model, data=args.data, steps=args.steps, cache_dir=args.cache_dir, progress=False,
                       seq_len=args.seq_len, batch_size=args.batch_size, checkpoint_every=args.steps,
                       eval_every=args.steps // 4)
    defaults = CompareConfig().optimizer_args
    jobs = []
    for quant in parse_list("quant", args.quant):
        for lr in parse_list("lrs", args.lrs, float):
            for name in parse_list("optimizers", args.optimizers):
                for seed in parse_list("seeds", args.seeds, int):
                    run_dir = _cell(Path(args.out_dir), quant, lr) / name / f"seed{seed}"
                    jobs.append(replace(base, optimizer=name, optimizer_args=dict(defaults.get(name, {})), lr=lr,
                                        seed=seed, quant=quant, resume=True, run_dir=str(run_dir)))
    return jobs


def _summarize(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out_dir)
    names, seeds = parse_list("optimizers", args.optimizers), parse_list("seeds", args.seeds, int)
    cells = []
    for quant in parse_list("quant", args.quant):
        for lr in parse_list("lrs", args.lrs, float):
            cell = _cell(out, quant, lr)
            write_report(cell, names, seeds)
            rows = {}
            for name in names:
                summaries = [json.loads((cell / name / f"seed{s}" / "summary.json").read_text()) for s in seeds]
                ppl = [s["val_perplexity"] for s in summaries]
                loss = [s["val_loss"] for s in summaries]
                rows[name] = {"val_perplexity": ppl, "val_loss": loss,
                              "val_perplexity_mean_std": mean_std(ppl), "val_loss_mean_std": mean_std(loss)}
            cells.append({"quant": quant, "lr": lr, "optimizers": rows})
    first = json.loads((_cell(out, cells[0]["quant"], cells[0]["lr"]) / names[0] / f"seed{seeds[0]}" /
                        "summary.json").read_text())
    device = first["device"]
    if device.startswith("cuda"):
        import torch

        device = f"{device} ({torch.cuda.get_device_name()})"
    summary = {"model": args.model, "steps": args.steps, "seeds": seeds, "device": device, "cells": cells}
    (out / f"summary-{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _plot(summary: dict[str, Any], path: Path) -> None:
    """One panel per scheme: final validation loss (mean ± std over seeds) against the learning rate per
    optimizer; with a single learning rate, bars per optimizer and scheme instead."""
    plt = pyplot()
    cells = summary["cells"]
    schemes = list(dict.fromkeys(c["quant"] for c in cells))
    names = list(cells[0]["optimizers"])
    lrs = sorted({c["lr"] for c in cells})
    if len(lrs) == 1:
        fig, ax = plt.subplots(figsize=(2 + 2.2 * len(schemes), 4))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            means, stds = zip(*[c["optimizers"][name]["val_perplexity_mean_std"] for c in cells])
            xs = [i + k * width for i in range(len(cells))]
            ax.bar(xs, [m if math.isfinite(m) else 0 for m in means], width, yerr=[s or 0 for s in stds],
                   capsize=3, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))], [c["quant"] for c in cells])
        ax.set(ylabel="final validation perplexity", title=f"{summary['model']}, {summary['steps']} steps, lr "
               f"{lrs[0]:g}, mean ± std over {len(summary['seeds'])} seeds")
    else:
        fig, axes = plt.subplots(1, len(schemes), figsize=(5.5 * len(schemes), 4), squeeze=False)
        for ax, scheme in zip(axes[0], schemes):
            for name in names:
                points = [(c["lr"], *c["optimizers"][name]["val_loss_mean_std"]) for c in cells
                          if c["quant"] == scheme]
                xs, means, stds = zip(*sorted(points))
                finite = [(x, m, s or 0) for x, m, s in zip(xs, means, stds) if math.isfinite(m)]
                if finite:
                    fx, fm, fs = zip(*finite)
                    ax.errorbar(fx, fm, yerr=fs, marker="o", capsize=3, label=name)
            ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss",
                   title=f"{scheme}: {summary['model']}, {summary['steps']} steps")
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/quant")
    parser.add_argument("--quant", default="none,int4,fp4")
    parser.add_argument("--optimizers", default="adamw,adam-clip,spam,stable-spam")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default="3e-3")
    parser.add_argument("--model", default="mini")
    parser.add_argument("--data", default="stdlib")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--cache-dir", default="runs/cache")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--name", default="comparison", help="the summary files are summary-NAME.json/png")
    args = parser.parse_args()
    jobs = _jobs(args)
    if args.workers > 1:
        prepare(jobs[0].data_config(), args.cache_dir)  # tokenized once, before the workers start
    run_jobs(jobs, train, workers=args.workers)
    summary = _summarize(args)
    _plot(summary, Path(args.out_dir) / f"summary-{args.name}.png")
    for cell in summary["cells"]:
        for name, row in cell["optimizers"].items():
            ppl = format_mean_std(*row["val_perplexity_mean_std"])
            print(f"{cell['quant']:>5} lr {cell['lr']:<7g} {name:<12} validation perplexity {ppl}")


if __name__ == "__main__":
    main()
