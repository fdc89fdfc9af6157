"""``spamopt finetune``: optimizers × seeds of one fine-tuning setting, then a report: ``report.md``,
``results.json`` (held-out accuracy and loss, mean ± sample std over seeds) and ``curves.png``. With the
default base, the ``mini`` LLaMA is first pre-trained on the embedded corpus by the harness (once: a finished
pre-training run is reused). Runs live in ``out_dir/<label>/seed<k>``; finished runs are reused, interrupted
ones resumed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..harness.config import option
from ..harness.metrics import read_records
from ..harness.report import format_mean_std, mean_curve, mean_std, plot_curves
from ..harness.runner import entry_options, parse_labelled, parse_list, run_jobs
from .train import FinetuneConfig, train

__all__ = ["FinetuneCompareConfig", "compare", "write_report", "DEFAULT_BASE"]

DEFAULT_BASE = "runs/finetune/base"


@dataclass
class FinetuneCompareConfig:
    optimizers: str = option("adamw,adam-clip,spam,stable-spam", "comma-separated optimizer names, or LABEL=NAME")
    seeds: str = option("0,1,2", "comma-separated seeds")
    out_dir: str = option("runs/finetune", "runs go to OUT/<label>/seed<k>; the report to OUT")
    optimizer_args: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "JSON: optimizer name or label → constructor options (an lr entry "
                                                "overrides --lr)"})
    pretrain_steps: int = option(600, "steps of the mini LLaMA's pre-training when --base is the default")
    workers: int = option(1, "runs at a time, as parallel single-thread processes")


def pretrain_base(base: str, steps: int) -> None:
    """The default base: the harness's mini LLaMA on the embedded corpus (AdamW, the usual recipe), reused
    once finished."""
    from ..lm.train import TrainConfig
    from ..lm.train import train as pretrain

    config = TrainConfig(model="mini", optimizer="adamw", lr=3e-3, steps=steps, seq_len=128, batch_size=16,
                         eval_every=0, checkpoint_every=100, run_dir=base, resume=True, progress=False)
    run_jobs([config], pretrain)


def compare(config: FinetuneCompareConfig, base: FinetuneConfig) -> Path:
    """Pre-train the default base if needed, run every (optimizer, seed) not finished, write the report."""
    out = Path(config.out_dir)
    if base.base == DEFAULT_BASE:
        pretrain_base(base.base, config.pretrain_steps)
    entries = parse_labelled("optimizers", config.optimizers)
    seeds = parse_list("seeds", config.seeds, int)
    jobs = []
    for label, name in entries.items():
        options, lr = entry_options(config.optimizer_args, label, name, base.lr)
        for seed in seeds:
            jobs.append(replace(base, optimizer=name, optimizer_args=options, lr=lr, seed=seed, resume=True,
                                run_dir=str(out / label / f"seed{seed}")))
    run_jobs(jobs, train, workers=config.workers)
    return write_report(out, list(entries), seeds)


def write_report(out: Path, labels: list[str], seeds: list[int]) -> Path:
    rows, curves = {}, {}
    for label in labels:
        runs = [out / label / f"seed{seed}" for seed in seeds]
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        records = [read_records(r) for r in runs]
        curves[label] = {key: mean_curve(records, key) for key in ("accuracy", "eval_loss")}
        rows[label] = {"optimizer": summaries[0]["optimizer"],
                       **{key: [s[key] for s in summaries] for key in ("accuracy", "eval_loss", "best_accuracy")}}
        for key in ("accuracy", "eval_loss", "best_accuracy"):
            rows[label][f"{key}_mean_std"] = mean_std(rows[label][key])
    first = out / labels[0] / f"seed{seeds[0]}"
    config = json.loads((first / "config.json").read_text())
    summary = json.loads((first / "summary.json").read_text())
    results = {"seeds": seeds, "config": config, "base": summary["base"], "device": summary.get("device", "cpu"),
               "train_items": summary["train_items"],
               "eval_items": summary["eval_items"], "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_curves(curves, [{"key": "accuracy", "title": "held-out multiple-choice accuracy", "ylabel": "accuracy",
                          "marker": "o"},
                         {"key": "eval_loss", "title": "held-out response loss", "ylabel": "loss per token",
                          "marker": "o", "yscale": "log"}], out / "curves.png")
    n = len(seeds)
    lines = ["# Fine-tuning: held-out multiple-choice accuracy", "",
             f"Base: {results['base']}. Data: `{config['data']}`, {results['train_items']} training and "
             f"{results['eval_items']} held-out items; {config['steps']} steps of {config['batch_size']} "
             f"examples, lr {config['lr']} (warmup {config['warmup_steps']}, cosine to 0.1×), loss on the "
             f"response only; seeds {seeds}. Accuracy: the candidate answer whose response is most likely.", "",
             f"| optimizer | accuracy ({n} seeds) | best accuracy | held-out loss |", "| --- | --- | --- | --- |"]
    for label, row in sorted(rows.items(), key=lambda kv: -kv[1]["accuracy_mean_std"][0]):
        lines.append(f"| {label} | {format_mean_std(*row['accuracy_mean_std'], digits=3)} | "
                     f"{format_mean_std(*row['best_accuracy_mean_std'], digits=3)} | "
                     f"{format_mean_std(*row['eval_loss_mean_std'], digits=3)} |")
    lines += ["", "![accuracy and loss](curves.png)", "", "Mean ± sample std over seeds, after the last step."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
