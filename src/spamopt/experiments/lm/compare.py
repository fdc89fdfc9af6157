"""Several optimizers × seeds on one training config, then a report: ``report.md``, ``curves.png``,
``memory.png`` and ``results.json`` (final validation perplexity as mean ± sample std over seeds, tokens/s,
optimizer state, peak step memory).

Each run lives in ``out_dir/<label>/seed<k>`` and resumes from its checkpoint, so an interrupted comparison
continues where it stopped; finished runs are not repeated. An optimizer entry is a registry name or
``LABEL=NAME``, so one optimizer can run under several settings (``spam-sparse,sparse-0.25=spam-sparse``).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from spamopt.plotting import pyplot, save
from spamopt.spikes.layers import BLOCK_TYPES
from spamopt.spikes.monitor import RECORDS_FILE
from spamopt.spikes.report import census, load_records

from ..harness.config import option
from ..harness.memory import galore_held_bytes, galore_state_bytes, matched_density, sparse_spam_state_bytes
from ..harness.metrics import read_records
from ..harness.processes import is_rank_zero
from ..harness.report import mean_curve, mean_std, plot_curves
from ..harness.runner import entry_options, parse_labelled, parse_list, run_dir, run_grid
from .config import CONFIGS, is_block_matrix
from .data import prepare
from .train import TrainConfig, train

# The paper's SPAM schedule (ΔT=500, N=150, D=20 over 10k+ steps) never resets in a few hundred steps; the
# default comparison is 200 steps, so it resets every 75 with a 20-step warmup (Stable-SPAM's MoRet, ΔT=1000
# in the paper, every 75 too). Pass '{}' for paper values.
SHORT_RUN_SPAM = {"reset_interval": 75, "warmup_steps": 20, "clip_delay": 10}


@dataclass
class CompareConfig:
    optimizers: str = option("spam,adamw,adam-clip", "comma-separated optimizer names, or LABEL=NAME to run "
                                                     "NAME under its own label and options")
    seeds: str = option("0,1", "comma-separated seeds")
    out_dir: str = option("runs/compare", "runs go to OUT/<optimizer>/seed<k>; the report to OUT")
    optimizer_args: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"spam": dict(SHORT_RUN_SPAM), "spam-sparse": dict(SHORT_RUN_SPAM),
                                 "stable-spam": {"reset_interval": SHORT_RUN_SPAM["reset_interval"]}},
        metadata={"help": "JSON: optimizer name or label → constructor options (a label's entry updates its "
                          "name's); an lr entry overrides the shared lr (default: SPAM's schedule scaled to 200 "
                          "steps; '{}' for the paper's)"})
    match_memory: str = option("", "give spam-sparse (each entry of that name without a density of its own) the "
                                   "density whose state equals a budget on the block matrices: galore:RANK "
                                   "(GaLore's nominal state at that rank, as the paper counted), galore-held:RANK "
                                   "(the memory galore-torch really holds there) or bytes:N")
    match_masks: bool = option(False, "count spam-sparse's 1-bit masks in the matched budget too (the paper "
                                      "counted the moments only)")
    workers: int = option(1, "runs at a time, as parallel single-thread processes (CPU; 1 under torchrun)")


def matched_memory(spec: str, model: str, include_mask: bool = False) -> dict[str, Any]:
    """``galore:RANK``, ``galore-held:RANK`` or ``bytes:N`` → the budget on ``model``'s block matrices and the
    matching density (moments only, as the paper counted, or with ``include_mask`` moments and 1-bit masks).
    ``galore`` is GaLore's nominal state (projector elements and moments: the paper's densities);
    ``galore-held`` the storage galore-torch really keeps alive (its projector slices a full SVD factor)."""
    kind, _, value = spec.partition(":")
    if kind not in ("galore", "galore-held", "bytes") or not value.isdigit() or int(value) < 1:
        raise ValueError(f"Invalid match_memory value: {spec!r} (galore:RANK, galore-held:RANK or bytes:N, "
                         "positive integers)")
    shapes = [s for n, s in CONFIGS[model].parameter_shapes().items() if is_block_matrix(n, s)]
    budgets = {"galore": galore_state_bytes, "galore-held": galore_held_bytes}
    budget = budgets[kind](shapes, int(value)) if kind in budgets else int(value)
    density = matched_density(shapes, budget, include_mask=include_mask)
    references = {"galore": f"GaLore rank {value} (nominal state)",
                  "galore-held": f"GaLore rank {value} (memory galore-torch holds)"}
    return {"reference": references.get(kind, f"{value} bytes"), "budget_bytes": budget,
            "density": density, "spam_sparse_bytes": sparse_spam_state_bytes(shapes, density),
            "galore_rank": int(value) if kind in budgets else None, "counts_masks": include_mask}


def compare(config: CompareConfig, base: TrainConfig) -> Path:
    """Run every (optimizer, seed) not finished yet, then write the report; returns ``report.md``'s path."""
    out = Path(config.out_dir)
    entries = parse_labelled("optimizers", config.optimizers)
    seeds = parse_list("seeds", config.seeds, int)

    matched = (matched_memory(config.match_memory, base.model, config.match_masks) if config.match_memory
               else None)

    def make_run(label: str, seed: int, directory: Path) -> TrainConfig:
        name = entries[label]
        options, lr = entry_options(config.optimizer_args, label, name, base.lr)
        if matched and name == "spam-sparse":
            options.setdefault("density", matched["density"])
        if matched and name == "galore" and matched["galore_rank"] is not None:
            options.setdefault("rank", matched["galore_rank"])  # the budget's rank is the rank GaLore runs at
        return replace(base, optimizer=name, optimizer_args=options, lr=lr, seed=seed, resume=True,
                       run_dir=str(directory))

    if config.workers > 1:
        prepare(base.data_config(), base.cache_dir)  # tokenized once, before the workers start
    run_grid(out, list(entries), seeds, make_run, train, workers=config.workers)
    if not is_rank_zero():  # under torchrun, rank 0 writes the report
        return out / "report.md"
    return write_report(out, list(entries), seeds, matched)


CURVE_PANELS = [
    {"key": "train_loss", "title": "training loss (mean over seeds)", "ylabel": "cross-entropy"},
    {"key": "val_perplexity", "title": "validation perplexity (mean over seeds)", "ylabel": "perplexity",
     "yscale": "log", "marker": "o"},
]


def write_report(out: Path, names: list[str], seeds: list[int], matched: dict[str, Any] | None = None) -> Path:
    """Aggregate the finished runs ``out/<name>/seed<k>`` into results.json, curves.png, memory.png and
    report.md."""
    results: dict[str, Any] = {"optimizers": {}, "matched_memory": matched}
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name in names:
        runs = [run_dir(out, name, seed) for seed in seeds]
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        run_config = json.loads((runs[0] / "config.json").read_text())
        records = [read_records(r) for r in runs]
        speeds = [x["tokens_per_s"] for rec in records for x in rec if "tokens_per_s" in x]
        ppl_mean, ppl_std = mean_std([s["val_perplexity"] for s in summaries])
        peaks = [s["peak_step_memory_bytes"] for s in summaries if "peak_step_memory_bytes" in s]
        results["optimizers"][name] = {
            "optimizer": run_config["optimizer"], "optimizer_args": run_config["optimizer_args"],
            "val_perplexity_mean": ppl_mean, "val_perplexity_std": ppl_std,
            "val_perplexity": [s["val_perplexity"] for s in summaries],
            "tokens_per_s_mean": statistics.fmean(speeds) if speeds else math.nan,
            "optimizer_state_bytes_per_process": summaries[0]["optimizer_state_bytes_per_process"],
            "peak_step_memory_bytes": max(peaks) if len(peaks) == len(summaries) else None,
        }
        if all((r / "spikes" / RECORDS_FILE).exists() for r in runs):
            results["optimizers"][name]["spikes"] = [census(load_records(r / "spikes")) for r in runs]
        curves[name] = {panel["key"]: mean_curve(records, panel["key"]) for panel in CURVE_PANELS}
    first_run = run_dir(out, names[0], seeds[0])
    config = json.loads((first_run / "config.json").read_text())
    first = json.loads((first_run / "summary.json").read_text())
    results.update(seeds=seeds, config=config, parameters=first["parameters"], device=first["device"],
                   peak_step_memory_method=first.get("peak_step_memory_method"))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_curves(curves, CURVE_PANELS, out / "curves.png")
    (out / "memory.png").unlink(missing_ok=True)  # an earlier report's, when the figures are now all equal
    plot_memory(results, out / "memory.png")
    return _markdown(results, out / "report.md")


MEMORY_PANELS = {"optimizer_state_bytes_per_process": "optimizer state (MiB)",
                 "peak_step_memory_bytes": "peak memory of a training step (MiB)"}
EQUAL_WITHIN = 0.01  # memory figures closer than this (relative) are reported as equal, not plotted


def equal_memory(results: dict[str, Any], key: str) -> bool:
    """Whether every optimizer's ``key`` figure lies within :data:`EQUAL_WITHIN` of the smallest."""
    values = [row[key] for row in results["optimizers"].values()]
    return bool(values) and all(values) and max(values) <= min(values) * (1 + EQUAL_WITHIN)


def plot_memory(results: dict[str, Any], path: Path) -> Path | None:
    """Final validation perplexity (mean ± std over seeds) against optimizer-state memory, and against the
    peak memory of a training step where measured: one point per optimizer. A figure on which all
    optimizers are equal to within 1 % is left out (the report says so); None when both are."""
    plt = pyplot()
    rows = results["optimizers"]
    panels = [(key, label) for key, label in MEMORY_PANELS.items()
              if all(row[key] for row in rows.values()) and not equal_memory(results, key)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, xlabel) in zip(axes[0], panels):
        for name, row in rows.items():
            if math.isfinite(row["val_perplexity_mean"]):
                ax.errorbar(row[key] / 2**20, row["val_perplexity_mean"], yerr=row["val_perplexity_std"] or 0,
                            marker="o", capsize=4, linestyle="none", label=name)
        ax.set(xlabel=xlabel, ylabel="final validation perplexity",
               title=f"mean ± std over {len(results['seeds'])} seed{'s' if len(results['seeds']) > 1 else ''}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save(fig, path)


def _describe(label: str, row: dict[str, Any]) -> str:
    """The label, with the registry name when it differs and the sparse density when set."""
    notes = [f"`{row['optimizer']}`"] if label != row["optimizer"] else []
    if "density" in row["optimizer_args"]:
        notes.append(f"density {row['optimizer_args']['density']}")
    return f"{label} ({', '.join(notes)})" if notes else label


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f} MiB"


def _spike_lines(results: dict[str, Any]) -> list[str]:
    """The spike census of the monitored optimizers (``--spikes`` / ``--forensics``), one row each."""
    monitored = {name: row["spikes"] for name, row in results["optimizers"].items() if "spikes" in row}
    if not monitored:
        return []

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else math.nan

    lines = ["", "Gradient spikes (coordinates whose Gradient Spike Score exceeded the monitor's threshold) per "
             "million coordinate-steps; block weights are the attention, MLP and norm weights (the embedding "
             "and head rows of rare tokens spike in any run); clipped coordinates are counted for SPAM only. "
             "`spamopt spikes report RUN_DIR` gives each run's plots and forensics.", "",
             "| optimizer | block-weight spikes / M, per seed | attention, MLP, norm (mean) | embedding, head "
             "(mean) | largest attention logit (mean) | loss spikes (largest rise, robust SDs) | "
             "coordinates clipped (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in monitored.items():
        per_type = [", ".join(f"{mean([r['rates_per_million'].get(k, 0.0) for r in runs]):.2f}" for k in kinds)
                    for kinds in (BLOCK_TYPES, ("embedding", "head"))]
        logit = mean([r["max_attention_logit"] for r in runs])
        per_seed = ", ".join(f"{r['block_spikes_per_million']:.2f}" for r in runs)
        counted = [r["clipped"] for r in runs if r["clipped"] is not None]
        clipped = f"{mean(counted):,.0f}" if len(counted) == len(runs) else "n/a"
        lines.append(f"| {name} | {per_seed} | "
                     f"{per_type[0]} | {per_type[1]} | {'n/a' if math.isnan(logit) else f'{logit:.3g}'} | "
                     f"{sum(len(r['loss_spikes']) for r in runs)} "
                     f"({max(r['largest_loss_rise'] for r in runs):.1f}) | {clipped} |")
    return lines


def _markdown(results: dict[str, Any], path: Path) -> Path:
    config = results["config"]
    n = len(results["seeds"])
    lines = [
        "# Optimizer comparison",
        "",
        f"LLaMA `{config['model']}` ({results['parameters'] / 1e6:.2f}M parameters) on `{config['data']}`, "
        f"{config['steps']} steps × {config['batch_size']} sequences × {config['seq_len']} tokens, peak lr "
        f"{config['lr']} (cosine, {config['warmup_steps']} warmup steps, floor {config['min_lr_ratio']}×), "
        f"seeds {results['seeds']}, device `{results['device']}`"
        + (f", block linears fake-quantised as `{config['quant']}`." if config.get("quant", "none") != "none" else "."),
        "",
        f"| optimizer | final validation perplexity (mean ± std, {n} seed{'s' if n > 1 else ''}) | per seed | "
        "tokens/s | optimizer state per process | peak step memory per process |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in sorted(results["optimizers"].items(), key=lambda kv: kv[1]["val_perplexity_mean"]):
        std = "n/a" if row["val_perplexity_std"] is None else f"{row['val_perplexity_std']:.2f}"
        seeds = ", ".join(f"{v:.2f}" for v in row["val_perplexity"])
        label = _describe(name, row)
        lines.append(f"| {label} | {row['val_perplexity_mean']:.2f} ± {std} | {seeds} | "
                     f"{row['tokens_per_s_mean']:,.0f} | {_mib(row['optimizer_state_bytes_per_process'])} | "
                     f"{_mib(row['peak_step_memory_bytes'])} |")
    matched = results.get("matched_memory")
    if matched:
        lines += ["", f"spam-sparse runs at density {matched['density']}, matched to {matched['reference']} "
                  f"({'moments and masks' if matched.get('counts_masks') else 'moments only'} counted): "
                  f"{matched['budget_bytes'] / 2**20:.2f} MiB of state on the block matrices against "
                  f"{matched['spam_sparse_bytes'] / 2**20:.2f} MiB for spam-sparse (moments and 1-bit masks)"
                  + (f"; GaLore entries without a rank of their own run at rank {matched['galore_rank']}."
                     if matched.get("galore_rank") else ".")]
    lines += _spike_lines(results)
    lines += ["", "![training loss and validation perplexity](curves.png)", ""]
    equal = [label for key, label in MEMORY_PANELS.items() if equal_memory(results, key)]
    if equal:
        said = " and ".join(equal)
        lines += [f"{said[0].upper()}{said[1:]}: the same for every optimizer to within "
                  f"{EQUAL_WITHIN:.0%}, so not plotted.", ""]
    if (path.parent / "memory.png").exists():
        lines += ["![final validation perplexity against memory](memory.png)", ""]
    lines += ["Std is the sample standard deviation over seeds; tokens/s excludes evaluation, checkpointing and the "
              "second step (measured for memory). Optimizer state is the bytes of the tensors in the optimizer's own "
              "state (moments, masks, projectors, counters).",
              f"Perplexity is exp of the mean token cross-entropy over the first {config['eval_tokens']:,} "
              "validation tokens."]
    if results.get("peak_step_memory_method"):
        lines.append(f"Peak step memory (the second step of each run, the largest over seeds): "
                     f"{results['peak_step_memory_method']}.")
    if any(math.isnan(r["val_perplexity_mean"]) for r in results["optimizers"].values()):
        lines.append("A NaN perplexity means the run diverged.")
    path.write_text("\n".join(lines) + "\n")
    return path
