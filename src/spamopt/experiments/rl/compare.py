"""``spamopt rl``: tasks × optimizers × seeds of PPO, then a report: ``report.md``, ``results.json`` (final and
best test reward, mean ± sample std over seeds, wall time) and one PNG per task of test reward against
environment steps, the mean over seeds with a ± one-std band, as the SPAM paper's Figure 1 (bottom row). Each
run lives in ``out_dir/<env>/<label>/seed<k>``; finished runs are reused, interrupted ones resumed."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spamopt.plotting import pyplot, save

from ..harness.config import option
from ..harness.metrics import read_records
from ..harness.report import format_mean_std, mean_std
from ..harness.runner import entry_options, parse_labelled, parse_list, run_jobs
from .train import RLConfig, train

__all__ = ["RLCompareConfig", "compare", "write_report"]


@dataclass
class RLCompareConfig:
    envs: str = option("Hopper-v5,Ant-v5,HalfCheetah-v5", "comma-separated gymnasium task ids")
    optimizers: str = option("adam,spam", "comma-separated optimizer names, or LABEL=NAME")
    seeds: str = option("0,1,2", "comma-separated seeds")
    out_dir: str = option("runs/rl", "runs go to OUT/<env>/<label>/seed<k>; the report to OUT")
    optimizer_args: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "JSON: optimizer name or label → constructor options (a label's "
                                                "entry updates its name's)"})
    workers: int = option(1, "runs at a time, as parallel single-thread processes")


def _run_dir(out: Path, env: str, label: str, seed: int) -> Path:
    return out / env / label / f"seed{seed}"


def compare(config: RLCompareConfig, base: RLConfig) -> Path:
    """Run every (task, optimizer, seed) not finished yet, then write the report; returns its path."""
    out = Path(config.out_dir)
    envs = parse_list("envs", config.envs)
    entries = parse_labelled("optimizers", config.optimizers)
    seeds = parse_list("seeds", config.seeds, int)
    jobs = []
    for env in envs:
        for label, name in entries.items():
            options, _ = entry_options(config.optimizer_args, label, name, 0.0)
            for seed in seeds:
                jobs.append(replace(base, env=env, optimizer=name, optimizer_args=options, seed=seed, resume=True,
                                    run_dir=str(_run_dir(out, env, label, seed))))
    run_jobs(jobs, train, workers=config.workers)
    return write_report(out, envs, list(entries), seeds)


def _band(runs: list[list[dict[str, Any]]]) -> tuple[list[int], list[float], list[float]]:
    """Steps every run evaluated at, the mean test reward there and its sample std over runs."""
    by_step: dict[int, list[float]] = {}
    for records in runs:
        for record in records:
            by_step.setdefault(record["step"], []).append(record["test_reward"])
    steps = [s for s in sorted(by_step) if len(by_step[s]) == len(runs)]
    means = [statistics.fmean(by_step[s]) for s in steps]
    stds = [statistics.stdev(by_step[s]) if len(runs) > 1 else 0.0 for s in steps]
    return steps, means, stds


def write_report(out: Path, envs: list[str], labels: list[str], seeds: list[int]) -> Path:
    results: dict[str, Any] = {"envs": {}, "seeds": seeds}
    for env in envs:
        rows, curves = {}, {}
        for label in labels:
            runs = [_run_dir(out, env, label, seed) for seed in seeds]
            summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
            curves[label] = _band([read_records(r) for r in runs])
            rows[label] = {
                "optimizer": summaries[0]["optimizer"], "options": summaries[0]["optimizer_options"],
                "timesteps": summaries[0]["timesteps"], "optimizer_steps": summaries[0]["optimizer_steps"],
                "final": [s["last"]["test_reward"] for s in summaries],
                "best": [s["best"]["test_reward"] for s in summaries],
                "train_seconds": [s["train_seconds"] for s in summaries],
            }
            for key in ("final", "best", "train_seconds"):
                rows[label][f"{key}_mean_std"] = mean_std(rows[label][key])
        results["envs"][env] = {"rows": rows, "ppo": summaries[0]["ppo"],
                                "steps_per_update": summaries[0]["steps_per_update"],
                                "plot": _plot(env, curves, out / f"{env}.png").name}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return _markdown(results, out / "report.md")


def _plot(env: str, curves: dict[str, tuple[list[int], list[float], list[float]]], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (steps, means, stds) in curves.items():
        ax.plot(steps, means, label=label)
        ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
    ax.set(title=f"{env}: PPO test reward", xlabel="environment steps", ylabel="test reward (deterministic policy)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def _markdown(results: dict[str, Any], path: Path) -> Path:
    n = len(results["seeds"])
    lines = ["# PPO on MuJoCo: test reward", "",
             f"stable-baselines3 PPO with RL Baselines3 Zoo's settings; seeds {results['seeds']}; the test reward "
             "is the mean undiscounted return of the deterministic policy over the evaluation episodes, on an "
             "environment separate from training. Mean ± sample std over seeds.", "",
             f"| task | optimizer | final test reward ({n} seeds) | best test reward | env steps | optimizer steps "
             "| train time (min) | options |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for env, entry in results["envs"].items():
        rows = sorted(entry["rows"].items(), key=lambda kv: -kv[1]["final_mean_std"][0])
        for label, row in rows:
            minutes = row["train_seconds_mean_std"][0] / 60
            options = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
            lines.append(f"| {env} | {label} | {format_mean_std(*row['final_mean_std'], digits=0)} | "
                         f"{format_mean_std(*row['best_mean_std'], digits=0)} | {row['timesteps']:,} | "
                         f"{row['optimizer_steps']:,} | {minutes:.1f} | {options} |")
    lines.append("")
    for env, entry in results["envs"].items():
        ppo = ", ".join(f"{k} {v}" for k, v in entry["ppo"].items())
        lines += [f"## {env}", "", f"PPO: {ppo}; {entry['steps_per_update']} optimizer steps per rollout.", "",
                  f"![{env}]({entry['plot']})", ""]
    path.write_text("\n".join(lines))
    return path
