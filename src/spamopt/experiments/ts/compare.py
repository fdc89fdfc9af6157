"""``spamopt ts``: severities × optimizers × seeds of one forecasting setting, then a report: ``report.md``,
``results.json`` (test MSE and MAE, mean ± sample std over seeds) and ``curves.png`` (test MSE against epoch,
one panel per severity, as Stable-SPAM's Figure 9). Each run lives in ``out_dir/S<severity>/<label>/seed<k>``;
finished runs are reused, interrupted ones resumed."""

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
from .train import TSConfig, train

__all__ = ["TSCompareConfig", "compare", "write_report"]


@dataclass
class TSCompareConfig:
    optimizers: str = option("adam,spam,stable-spam", "comma-separated optimizer names, or LABEL=NAME")
    severities: str = option("0,2,5", "comma-separated anomaly severities S")
    seeds: str = option("0,1,2", "comma-separated seeds")
    out_dir: str = option("runs/ts", "runs go to OUT/S<severity>/<label>/seed<k>; the report to OUT")
    optimizer_args: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "JSON: optimizer name or label → constructor options (a label's "
                                                "entry updates its name's; an lr entry overrides --lr)"})
    workers: int = option(1, "runs at a time, as parallel single-thread processes")


def _cell(out: Path, severity: float) -> Path:
    return out / f"S{severity:g}"


def compare(config: TSCompareConfig, base: TSConfig) -> Path:
    """Run every (severity, optimizer, seed) not finished yet, then write the report; returns its path."""
    out = Path(config.out_dir)
    entries = parse_labelled("optimizers", config.optimizers)
    severities = parse_list("severities", config.severities, float)
    seeds = parse_list("seeds", config.seeds, int)
    jobs = []
    for severity in severities:
        for label, name in entries.items():
            options, lr = entry_options(config.optimizer_args, label, name, base.lr)
            for seed in seeds:
                jobs.append(replace(base, optimizer=name, optimizer_args=options, lr=lr, severity=severity,
                                    seed=seed, resume=True, run_dir=str(_cell(out, severity) / label / f"seed{seed}")))
    run_jobs(jobs, train, workers=config.workers)
    return write_report(out, list(entries), severities, seeds)


def write_report(out: Path, labels: list[str], severities: list[float], seeds: list[int]) -> Path:
    results: dict[str, Any] = {"severities": {}, "seeds": seeds}
    curves: dict[float, dict[str, list[list[dict[str, Any]]]]] = {}
    for severity in severities:
        rows, curves[severity] = {}, {}
        for label in labels:
            runs = [_cell(out, severity) / label / f"seed{seed}" for seed in seeds]
            summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
            curves[severity][label] = [read_records(r) for r in runs]
            row: dict[str, Any] = {"optimizer": summaries[0]["optimizer"],
                                   "epochs_run": [s["epochs_run"] for s in summaries]}
            for when in ("best", "last"):
                for metric in ("test_mse", "test_mae"):
                    values = [s[when][metric] for s in summaries]
                    row[f"{when}_{metric}"] = values
                    row[f"{when}_{metric}_mean_std"] = mean_std(values)
            rows[label] = row
        results["severities"][f"{severity:g}"] = rows
    first = _cell(out, severities[0]) / labels[0] / f"seed{seeds[0]}"
    results["config"] = json.loads((first / "config.json").read_text())
    first_summary = json.loads((first / "summary.json").read_text())
    results["data"], results["columns"] = first_summary["data"], first_summary.get("columns")
    results["ignored_columns"] = first_summary.get("ignored_columns")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(curves, out / "curves.png")
    return _markdown(results, out / "report.md")


def _plot(curves: dict[float, dict[str, list[list[dict[str, Any]]]]], path: Path) -> Path:
    """Test MSE against epoch per severity: the mean over seeds, shaded ± one std (over the seeds still
    training at that epoch)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (severity, by_label) in zip(axes[0], curves.items()):
        for label, runs in by_label.items():
            by_epoch: dict[int, list[float]] = {}
            for records in runs:
                for record in records:
                    by_epoch.setdefault(record["step"], []).append(record["test_mse"])
            epochs = sorted(by_epoch)
            means = [statistics.fmean(by_epoch[e]) for e in epochs]
            stds = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
            ax.plot(epochs, means, label=label)
            ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            alpha=0.2)
        ax.set(title=f"severity S = {severity:g}", xlabel="epoch", ylabel="test MSE")
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def _markdown(results: dict[str, Any], path: Path) -> Path:
    config = results["config"]
    n = len(results["seeds"])
    stop = (f"early stopping on the validation MSE (patience {config['patience']}); test error at the best "
            "validation epoch" if config["patience"] else "no early stopping; test error after the last epoch")
    lines = [
        "# Forecasting with injected anomalies",
        "",
        f"PatchTST on `{results['data']}`, look-back {config['lookback']}, horizon {config['horizon']}, "
        f"{config['epochs']} epochs at most, batch {config['batch_size']}, lr {config['lr']}; anomalies in "
        f"{config['anomaly_fraction']:.0%} of the training input values; seeds {results['seeds']}; {stop}.",
        "",
        *([f"Columns forecast ({len(results['columns'])}): {', '.join(results['columns'])}"
           + (f"; text columns ignored: {', '.join(results['ignored_columns'])}" if results.get("ignored_columns")
              else "") + ".", ""] if results.get("columns") else []),
        f"| severity | optimizer | test MSE (mean ± std, {n} seeds) | test MAE | epochs run |",
        "| --- | --- | --- | --- | --- |",
    ]
    when = "best" if config["patience"] else "last"
    for severity, rows in results["severities"].items():
        for label, row in sorted(rows.items(), key=lambda kv: kv[1][f"{when}_test_mse_mean_std"][0]):
            lines.append(f"| {severity} | {label} | {format_mean_std(*row[f'{when}_test_mse_mean_std'], digits=4)} | "
                         f"{format_mean_std(*row[f'{when}_test_mae_mean_std'], digits=4)} | "
                         f"{', '.join(map(str, row['epochs_run']))} |")
    lines += ["", "![test MSE against epoch](curves.png)", "",
              "Errors are in standardised units (training-split statistics), over every test window; std is the "
              "sample standard deviation over seeds. The curves show the test MSE of every epoch run."]
    path.write_text("\n".join(lines) + "\n")
    return path

