"""Several optimizers × seeds on one training config, then a report: ``report.md``, ``curves.png`` and
``results.json`` (final validation perplexity as mean ± sample std over seeds, tokens/s, optimizer state).

Each run lives in ``out_dir/<optimizer>/seed<k>`` and resumes from its checkpoint, so an interrupted comparison
continues where it stopped; finished runs are not repeated.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .train import TrainConfig, option, train

# The paper's SPAM schedule (ΔT=500, N=150, D=20 over 10k+ steps) never resets in a few hundred steps; the
# default comparison is 200 steps, so it resets every 75 with a 20-step warmup. Pass '{}' for paper values.
SHORT_RUN_SPAM = {"reset_interval": 75, "warmup_steps": 20, "clip_delay": 10}


@dataclass
class CompareConfig:
    optimizers: str = option("spam,adamw,adam-clip", "comma-separated optimizer names")
    seeds: str = option("0,1", "comma-separated seeds")
    out_dir: str = option("runs/compare", "runs go to OUT/<optimizer>/seed<k>; the report to OUT")
    optimizer_args: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"spam": dict(SHORT_RUN_SPAM), "spam-sparse": dict(SHORT_RUN_SPAM)},
        metadata={"help": "JSON: optimizer name → constructor options; an lr entry overrides the shared lr "
                          "(default: SPAM's schedule scaled to 200 steps; '{}' for the paper's)"})


def compare(config: CompareConfig, base: TrainConfig) -> Path:
    """Run every (optimizer, seed) not finished yet, then write the report; returns ``report.md``'s path."""
    out = Path(config.out_dir)
    names = [n.strip() for n in config.optimizers.split(",") if n.strip()]
    seeds = [int(s) for s in config.seeds.split(",") if s.strip()]
    if not names or not seeds:
        raise ValueError(f"Invalid optimizers/seeds value: {config.optimizers!r} / {config.seeds!r} (non-empty)")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    for name in names:
        options = dict(config.optimizer_args.get(name, {}))
        lr = options.pop("lr", base.lr)
        for seed in seeds:
            run = replace(base, optimizer=name, optimizer_args=options, lr=lr, seed=seed, resume=True,
                          run_dir=str(out / name / f"seed{seed}"))
            if _finished(run):
                continue
            if rank == 0:
                print(f"== {name}, seed {seed} -> {run.run_dir}", flush=True)
            train(run)
    if rank != 0:  # under torchrun, rank 0 writes the report
        return out / "report.md"
    return write_report(out, names, seeds)


def _finished(run: TrainConfig) -> bool:
    run_dir = Path(run.run_dir)
    if not (run_dir / "summary.json").exists() or not (run_dir / "config.json").exists():
        return False
    return json.loads((run_dir / "config.json").read_text()) == json.loads(json.dumps(asdict(run)))


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def write_report(out: Path, names: list[str], seeds: list[int]) -> Path:
    """Aggregate finished runs under ``out`` into results.json, curves.png and report.md."""
    results: dict[str, Any] = {"optimizers": {}}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name in names:
        runs = [out / name / f"seed{seed}" for seed in seeds]
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        records = [_records(r) for r in runs]
        throughput = [statistics.fmean(x["tokens_per_s"] for x in rec if "tokens_per_s" in x) for rec in records]
        ppl_mean, ppl_std = _mean_std([s["val_perplexity"] for s in summaries])
        results["optimizers"][name] = {
            "val_perplexity_mean": ppl_mean, "val_perplexity_std": ppl_std,
            "val_perplexity": [s["val_perplexity"] for s in summaries],
            "tokens_per_s_mean": statistics.fmean(throughput),
            "optimizer_state_bytes_per_process": summaries[0]["optimizer_state_bytes_per_process"],
        }
        curves[name] = {key: _mean_curve(records, key) for key in ("train_loss", "val_perplexity")}
    config = json.loads((out / names[0] / f"seed{seeds[0]}" / "config.json").read_text())
    first = json.loads((out / names[0] / f"seed{seeds[0]}" / "summary.json").read_text())
    results.update(seeds=seeds, config=config, parameters=first["parameters"], device=first["device"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(curves, out / "curves.png")
    return _markdown(results, out / "report.md")


def _mean_curve(records: list[list[dict[str, Any]]], key: str) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for run in records:
        for record in run:
            if key in record:
                by_step.setdefault(record["step"], []).append(record[key])
    return [(step, statistics.fmean(v)) for step, v in sorted(by_step.items()) if len(v) == len(records)]


def _plot(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    from ..extras import require

    require("matplotlib", "report")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, series in curves.items():
        for ax, key in ((loss_ax, "train_loss"), (ppl_ax, "val_perplexity")):
            if series[key]:
                steps, values = zip(*series[key])
                ax.plot(steps, values, marker="o" if key == "val_perplexity" else None, label=name)
    loss_ax.set(title="training loss (mean over seeds)", xlabel="step", ylabel="cross-entropy")
    ppl_ax.set(title="validation perplexity (mean over seeds)", xlabel="step", ylabel="perplexity", yscale="log")
    for ax in (loss_ax, ppl_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(results: dict[str, Any], path: Path) -> Path:
    config = results["config"]
    n = len(results["seeds"])
    lines = [
        "# Optimizer comparison",
        "",
        f"LLaMA `{config['model']}` ({results['parameters'] / 1e6:.2f}M parameters) on `{config['data']}`, "
        f"{config['steps']} steps × {config['batch_size']} sequences × {config['seq_len']} tokens, peak lr "
        f"{config['lr']} (cosine, {config['warmup_steps']} warmup steps, floor {config['min_lr_ratio']}×), "
        f"seeds {results['seeds']}, device `{results['device']}`.",
        "",
        f"| optimizer | final validation perplexity (mean ± std, {n} seed{'s' if n > 1 else ''}) | per seed | "
        "tokens/s | optimizer state per process |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in sorted(results["optimizers"].items(), key=lambda kv: kv[1]["val_perplexity_mean"]):
        std = "n/a" if row["val_perplexity_std"] is None else f"{row['val_perplexity_std']:.2f}"
        seeds = ", ".join(f"{v:.2f}" for v in row["val_perplexity"])
        lines.append(f"| {name} | {row['val_perplexity_mean']:.2f} ± {std} | {seeds} | "
                     f"{row['tokens_per_s_mean']:,.0f} | {row['optimizer_state_bytes_per_process'] / 2**20:.2f} MiB |")
    lines += ["", "![training loss and validation perplexity](curves.png)", "",
              "Std is the sample standard deviation over seeds; tokens/s excludes evaluation and checkpointing.",
              f"Perplexity is exp of the mean token cross-entropy over the first {config['eval_tokens']:,} "
              "validation tokens."]
    if any(math.isnan(r["val_perplexity_mean"]) for r in results["optimizers"].values()):
        lines.append("A NaN perplexity means the run diverged.")
    path.write_text("\n".join(lines) + "\n")
    return path
