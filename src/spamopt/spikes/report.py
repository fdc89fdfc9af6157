"""Offline report of a monitored run: PNG plots and a markdown summary from ``spikes.jsonl``."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..jsonl import read_jsonl
from ..plotting import pyplot, save
from .layers import BLOCK_TYPES, LAYER_TYPES, layer_type
from .monitor import RECORDS_FILE


def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / RECORDS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {RECORDS_FILE} in {run_dir}: run a SpikeMonitor with run_dir={run_dir!s}")
    records = read_jsonl(path)
    if not any(r.get("kind") == "meta" for r in records):
        raise ValueError(f"{path} holds no monitor records (it is empty, or not a SpikeMonitor's {RECORDS_FILE})")
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Spike totals by layer type, depth and tensor; loss; optimizer events."""
    meta = next(r for r in records if r["kind"] == "meta")
    numel = {t["name"]: t["numel"] for t in meta["tensors"]}
    by_type: dict[str, dict[str, float]] = {k: {"spikes": 0, "numel": 0, "observations": 0} for k in LAYER_TYPES}
    for name, count in numel.items():
        by_type[layer_type(name)]["numel"] += count
    by_tensor: dict[str, int] = defaultdict(int)
    by_depth: dict[Any, int] = defaultdict(int)
    depth_of = {t["name"]: t["depth"] for t in meta["tensors"]}
    spikes_per_step: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    max_gss = 0.0
    for r in records:
        if r["kind"] != "tensor" or "spikes" not in r:
            continue
        kind = layer_type(r["name"])
        by_type[kind]["spikes"] += r["spikes"]
        by_type[kind]["observations"] += numel[r["name"]]
        by_tensor[r["name"]] += r["spikes"]
        by_depth[depth_of[r["name"]]] += r["spikes"]
        spikes_per_step[r["step"]][kind] += r["spikes"]
        max_gss = max(max_gss, r["max_gss"])
    optimizer = [r for r in records if r["kind"] == "optimizer"]
    losses = [(r["step"], r["loss"]) for r in records if r["kind"] == "loss"]
    return {
        "threshold": meta["threshold"],
        "by_type": {k: v for k, v in by_type.items() if v["numel"]},
        "by_tensor": dict(by_tensor),
        "by_depth": dict(by_depth),
        "spikes_per_step": {s: dict(v) for s, v in sorted(spikes_per_step.items())},
        "max_gss": max_gss,
        "loss": losses,
        "loss_spikes": loss_spikes(losses),
        "clipped": sum(sum(r["clipped"].values()) for r in optimizer),
        "resets": [r["step"] for r in optimizer if r["reset"]],
        "skipped": [r["step"] for r in optimizer if r["skipped"]],
        "histogram": _histogram(records, meta),
    }


def census(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A monitored run's spike figures: spikes (GSS above the monitor's threshold) per million
    coordinate-steps by layer type and over the block weights (:data:`~spamopt.spikes.layers.BLOCK_TYPES`),
    the largest block-weight GSS, the largest attention logit ``max q·k/√d`` of any layer and step (NaN when
    the run did not record forensics), the loss spikes' steps (:func:`loss_spikes`), the largest rise of the
    loss in robust standard deviations (:func:`largest_loss_rise`) and the coordinates the optimizer's
    spike-aware clipping clipped over all steps, in all and by layer type (None where the optimizer does not
    report them: only SPAM does)."""
    summary = summarize(records)
    by_type = summary["by_type"]
    rates = {kind: 1e6 * v["spikes"] / v["observations"] if v["observations"] else 0.0
             for kind, v in by_type.items()}
    block = [by_type[kind] for kind in BLOCK_TYPES if kind in by_type]
    observations = sum(v["observations"] for v in block)
    max_block_gss = max((r["max_gss"] for r in records if r["kind"] == "tensor" and "max_gss" in r
                         and layer_type(r["name"]) in BLOCK_TYPES), default=0.0)
    counted = any(r["kind"] == "optimizer" for r in records)  # only a SPAM optimizer reports its clipping
    clipped_by_type: dict[str, int] = defaultdict(int)
    for r in records:
        if r["kind"] == "optimizer":
            for name, count in r["clipped"].items():
                clipped_by_type[layer_type(name)] += count
    return {
        "rates_per_million": rates,
        "block_spikes_per_million": 1e6 * sum(v["spikes"] for v in block) / observations if observations else 0.0,
        "max_block_gss": max_block_gss,
        "max_attention_logit": max(attention_logits(records).values(), default=math.nan),
        "loss_spikes": [e["step"] for e in summary["loss_spikes"]],
        "largest_loss_rise": largest_loss_rise(summary["loss"]),
        "clipped": summary["clipped"] if counted else None,
        "clipped_by_type": dict(clipped_by_type) if counted else None,
    }


def attention_logits(records: list[dict[str, Any]]) -> dict[int, float]:
    """Step → the largest attention logit ``max q·k/√d`` over the layers that step (forensics' signals;
    empty for a run that recorded none)."""
    return {r["step"]: max(value for name, value in r["values"].items() if name.startswith("max_attention_logit"))
            for r in records if r["kind"] == "signals"
            and any(name.startswith("max_attention_logit") for name in r["values"])}


def _against_running_median(losses: list[tuple[int, float]], window: int):
    """``(step, loss, median, spread)`` from the ``window``-th loss on: the median of the previous ``window``
    losses and their robust standard deviation (1.4826 × the median absolute deviation, the standard
    deviation of Gaussian noise)."""
    import statistics

    for i in range(window, len(losses)):
        history = [value for _, value in losses[i - window:i]]
        median = statistics.median(history)
        spread = 1.4826 * statistics.median(abs(value - median) for value in history)
        yield losses[i][0], losses[i][1], median, spread


def loss_spikes(losses: list[tuple[int, float]], window: int = 50, deviations: float = 6.0,
                min_rise: float = 0.05) -> list[dict[str, float]]:
    """Steps where the loss spikes: it exceeds the median of the previous ``window`` losses by more than
    ``deviations`` robust standard deviations (1.4826 × the median absolute deviation, the standard deviation
    of Gaussian noise) and by at least ``min_rise`` nats. A run of consecutive such steps is one spike, at its
    first step. Each: ``{"step", "loss", "median", "rise"}``."""
    found: list[dict[str, float]] = []
    previous_flagged = False
    for step, value, median, spread in _against_running_median(losses, window):
        flagged = value - median > max(deviations * spread, min_rise)
        if flagged and not previous_flagged:
            found.append({"step": step, "loss": value, "median": median, "rise": value - median})
        previous_flagged = flagged
    return found


def largest_loss_rise(losses: list[tuple[int, float]], window: int = 50) -> float:
    """The largest rise of the loss above the median of the previous ``window`` losses, in robust standard
    deviations (:func:`loss_spikes`' measure; it flags 6): how close a run came to a loss spike. Gaussian noise
    reaches about 3 over a few hundred steps. 0 for a run shorter than the window."""
    return max((max(value - median, 0.0) / spread for _, value, median, spread
                in _against_running_median(losses, window) if spread > 0), default=0.0)


JUMP_Z = 3.0  # a tensor's gradient "jumped" at a step when its norm is this many standard deviations above its mean


def precursors(records: list[dict[str, Any]], step: int, lookback: int) -> list[dict[str, Any]]:
    """The tensors whose gradient norm jumped (z-score >= :data:`JUMP_Z` against the tensor's running mean and
    standard deviation) in the ``lookback`` steps up to and including ``step``, in the order they first did
    (largest z first within a step): ``{"name", "first", "max_norm_z", "spikes", "max_gss"}``, the last two
    over the same steps (spiking coordinates, GSS above the threshold; 0 for tensors in tensor mode). A
    z-score, unlike a spike count, does not flag the embedding rows of rare tokens, which spike every step."""
    window = [r for r in records if r["kind"] == "tensor" and step - lookback <= r["step"] <= step]
    jumped = {}
    for r in sorted(window, key=lambda r: (r["step"], -r["norm_z"])):
        if r["norm_z"] >= JUMP_Z and r["name"] not in jumped:
            jumped[r["name"]] = {"name": r["name"], "first": r["step"], "max_norm_z": r["norm_z"], "spikes": 0,
                                 "max_gss": 0.0}
    for r in window:
        entry = jumped.get(r["name"])
        if entry is not None:
            entry["max_norm_z"] = max(entry["max_norm_z"], r["norm_z"])
            entry["spikes"] += r.get("spikes", 0)
            entry["max_gss"] = max(entry["max_gss"], r.get("max_gss", 0.0))
    return list(jumped.values())


def forensic_z_scores(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
    """Per forensic series — ``("update", tensor)`` (update RMS) and ``("signal", name)`` — the z-score of each
    step's value against the mean and standard deviation of the series' earlier steps (0 until two are known),
    the same running statistic the monitor keeps for gradient norms."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r["kind"] == "update" and r.get("update_rms") is not None:
            series[("update", r["name"])].append((r["step"], r["update_rms"]))
        elif r["kind"] == "signals":
            for name, value in r["values"].items():
                series[("signal", name)].append((r["step"], value))
    scores: dict[tuple[str, str], dict[int, float]] = {}
    for key, values in series.items():
        count, mean, m2, z = 0, 0.0, 0.0, {}
        for step, value in sorted(values):
            spread = (m2 / (count - 1)) ** 0.5 if count >= 2 else 0.0
            z[step] = (value - mean) / max(spread, 1e-30) if count >= 2 else 0.0
            count += 1
            delta = value - mean
            mean += delta / count
            m2 += delta * (value - mean)
        scores[key] = z
    return scores


def forensic_precursors(scores: dict[tuple[str, str], dict[int, float]], step: int,
                        lookback: int) -> list[dict[str, Any]]:
    """The forensic series (see :func:`forensic_z_scores`) that jumped (z >= :data:`JUMP_Z`) in the
    ``lookback`` steps up to and including ``step``, in the order they first did (largest z first within a
    step): ``{"series", "name", "first", "max_z"}``."""
    found = []
    for (series, name), z in scores.items():
        window = [(s, v) for s, v in z.items() if step - lookback <= s <= step]
        jumps = [s for s, v in window if v >= JUMP_Z]
        if jumps:
            found.append({"series": series, "name": name, "first": min(jumps), "max_z": max(v for _, v in window)})
    return sorted(found, key=lambda e: (e["first"], -e["max_z"]))


def _histogram(records, meta):
    counts = None
    for r in records:
        if r["kind"] == "gss_histogram":
            counts = r["counts"] if counts is None else [a + b for a, b in zip(counts, r["counts"])]
    return (meta["histogram_edges"], counts) if counts else None


def _plots(records, summary, out: Path) -> list[Path]:
    import numpy as np

    plt = pyplot()

    paths = []
    steps = sorted({r["step"] for r in records if r["kind"] == "tensor"})
    kinds = [k for k in LAYER_TYPES if k in summary["by_type"]]
    spike_steps = summary["spikes_per_step"]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[2, 1])
    if summary["loss"]:
        x, y = zip(*summary["loss"])
        top.plot(x, y, lw=1, color="tab:blue", label="training loss")
        loss_at = dict(summary["loss"])
        marked = [s for s, v in spike_steps.items() if sum(v.values()) > 0 and s in loss_at]
        if marked:
            top.scatter(marked, [loss_at[s] for s in marked], color="tab:red", s=14, zorder=3,
                        label=f"step with GSS > {summary['threshold']:g}")
        if summary["loss_spikes"]:
            top.scatter([e["step"] for e in summary["loss_spikes"]], [e["loss"] for e in summary["loss_spikes"]],
                        marker="v", s=60, facecolors="none", edgecolors="black", zorder=4, label="loss spike")
        for step in summary["resets"]:
            top.axvline(step, color="grey", lw=0.6, ls=":")
        top.legend(loc="upper right")
    top.set_ylabel("loss")
    top.set_title("Training loss and gradient spikes")
    totals = [sum(spike_steps.get(s, {}).values()) for s in steps]
    bottom.bar(steps, totals, width=1.0, color="tab:red")
    bottom.set_yscale("symlog")
    bottom.set_ylabel("spiking coordinates")
    bottom.set_xlabel("step")
    paths.append(save(fig, out / "loss_spikes.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    for kind in kinds:
        ax.plot(steps, [spike_steps.get(s, {}).get(kind, 0) for s in steps], lw=1, label=kind)
    ax.set_yscale("symlog")
    ax.set_xlabel("step")
    ax.set_ylabel("spiking coordinates")
    ax.set_title("Spikes per step by layer type")
    ax.legend()
    paths.append(save(fig, out / "spikes_by_layer_type.png"))

    meta = next(r for r in records if r["kind"] == "meta")
    names = [t["name"] for t in meta["tensors"] if t["mode"] == "element"]
    row_of = {n: i for i, n in enumerate(names)}
    col_of = {s: i for i, s in enumerate(steps)}
    grid = np.zeros((len(names), len(steps)))
    for r in records:
        if r["kind"] == "tensor" and "spikes" in r:
            grid[row_of[r["name"]], col_of[r["step"]]] = r["spikes"]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.18 * len(names) + 1.5)))
    image = ax.imshow(np.log10(1 + grid), aspect="auto", interpolation="nearest", cmap="magma",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5) if steps else None)
    ax.set_yticks(range(len(names)), names, fontsize=6 if len(names) > 30 else 8)
    ax.set_xlabel("step")
    ax.set_title("Spiking coordinates per tensor (log10(1 + count))")
    fig.colorbar(image, ax=ax)
    paths.append(save(fig, out / "spikes_heatmap.png"))

    if summary["histogram"]:
        edges, counts = summary["histogram"]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.stairs(counts, edges, fill=True, color="tab:blue")
        ax.axvline(summary["threshold"], color="tab:red", ls="--", label=f"threshold {summary['threshold']:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Gradient Spike Score (first bin: ≤ 1e-3, zeros included)")
        ax.set_ylabel("coordinate-steps")
        ax.set_title("Distribution of the Gradient Spike Score")
        ax.legend()
        paths.append(save(fig, out / "gss_histogram.png"))
    return paths


PRECURSOR_STEPS = 5  # how far before a loss spike the report looks for the gradients that led it
_PRECURSORS_LISTED = 8
_FORENSIC_NAMES = {"update": "update RMS", "signal": "signal"}


def _forensics_figure(records, summary, spike, found, scores, out: Path) -> Path:
    """Loss and the z-scores of the earliest precursors around one loss spike."""
    plt = pyplot()
    low, high = spike["step"] - 30, spike["step"] + 10
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[1, 2])
    near = [(s, v) for s, v in summary["loss"] if low <= s <= high]
    if near:
        top.plot(*zip(*near), lw=1, color="tab:blue")
    top.axvline(spike["step"], color="black", lw=0.8, ls="--")
    top.set_ylabel("training loss")
    top.set_title(f"Loss spike at step {spike['step']} and what jumped before it")
    gradient_z: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r["kind"] == "tensor" and low <= r["step"] <= high:
            gradient_z[r["name"]][r["step"]] = r["norm_z"]
    for entry in found[:6]:
        if entry["series"] == "gradient":
            z, label = gradient_z[entry["name"]], f"gradient norm: {entry['name']}"
        else:
            z = {s: v for s, v in scores[(entry["series"], entry["name"])].items() if low <= s <= high}
            label = f"{_FORENSIC_NAMES[entry['series']]}: {entry['name']}"
        steps = sorted(z)
        bottom.plot(steps, [z[s] for s in steps], lw=1, marker=".", label=label)
    bottom.axhline(JUMP_Z, color="grey", lw=0.6, ls=":")
    bottom.axvline(spike["step"], color="black", lw=0.8, ls="--")
    bottom.set_yscale("symlog")
    bottom.set_ylabel("z-score against the running mean")
    bottom.set_xlabel("step")
    if found:
        bottom.legend(fontsize=7, loc="upper left")
    return save(fig, out / f"loss_spike_{spike['step']}.png")


def _loss_spike_section(records, summary, out: Path | None = None) -> list[str]:
    spikes = summary["loss_spikes"]
    lines = ["", "## Loss spikes", "",
             "A loss spike: a step whose training loss exceeds the median of the previous 50 steps by more than "
             "6 robust standard deviations (1.4826 × the median absolute deviation) and by at least 0.05 nats; "
             "consecutive such steps count once. Below each: the tensors whose gradient norm jumped "
             f"({JUMP_Z:g} or more standard deviations above its running mean) in the {PRECURSOR_STEPS} steps "
             "before it (and at it), in the order they first did, with their spiking coordinates over those "
             "steps.", ""]
    if not spikes:
        return lines + [f"None in {len(summary['loss'])} logged steps."]
    scores = forensic_z_scores(records)
    if scores:
        lines += ["With forensics recorded (update RMS per tensor, named signals such as attention logits), a "
                  "second table lists the series that jumped by the same z-score rule.", ""]
    for spike in spikes:
        lines += [f"### Step {spike['step']}: loss {spike['loss']:.4f}, {spike['rise']:+.4f} over the median", ""]
        found = precursors(records, spike["step"], PRECURSOR_STEPS)
        if not found:
            lines += ["No gradient norm jumped in the steps before it.", ""]
        else:
            lines += ["| first jump | tensor | largest gradient-norm z | spiking coordinates | largest GSS |",
                      "| ---: | --- | ---: | ---: | ---: |"]
            lines += [f"| {e['first']} | `{e['name']}` | {e['max_norm_z']:.1f} | {e['spikes']:,} | "
                      f"{e['max_gss']:.0f} |" for e in found[:_PRECURSORS_LISTED]]
            if len(found) > _PRECURSORS_LISTED:
                lines.append(f"| | {len(found) - _PRECURSORS_LISTED} more tensors | | | |")
            lines.append("")
        forensic = forensic_precursors(scores, spike["step"], PRECURSOR_STEPS) if scores else []
        if forensic:
            lines += ["| first jump | series | tensor or signal | largest z |", "| ---: | --- | --- | ---: |"]
            lines += [f"| {e['first']} | {_FORENSIC_NAMES[e['series']]} | `{e['name']}` | {e['max_z']:.1f} |"
                      for e in forensic[:_PRECURSORS_LISTED]]
            if len(forensic) > _PRECURSORS_LISTED:
                lines.append(f"| | | {len(forensic) - _PRECURSORS_LISTED} more series | |")
            lines.append("")
        if out is not None and (found or forensic):
            merged = sorted([{"series": "gradient", "name": e["name"], "first": e["first"],
                              "max_z": e["max_norm_z"]} for e in found] + forensic,
                            key=lambda e: (e["first"], -e["max_z"]))
            image = _forensics_figure(records, summary, spike, merged, scores, out)
            lines += [f"![{image.stem}]({image.name})", ""]
    return lines


def build_report(run_dir: str | Path) -> Path:
    """Write the PNG plots and ``report.md`` into ``run_dir``; returns the markdown path."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    summary = summarize(records)
    images = _plots(records, summary, run_dir)
    lines = [f"# Gradient-spike report: {run_dir.name}", "",
             f"Spike: Gradient Spike Score > {summary['threshold']:g}. Largest GSS seen: {summary['max_gss']:.1f}.",
             ""]
    if summary["loss"]:
        first, last = summary["loss"][0], summary["loss"][-1]
        lines += [f"Loss {first[1]:.4f} (step {first[0]}) → {last[1]:.4f} (step {last[0]}).", ""]
    lines += ["| layer type | parameters | spikes | spikes per million coordinate-steps |",
              "| --- | ---: | ---: | ---: |"]
    for kind, row in summary["by_type"].items():
        rate = 1e6 * row["spikes"] / row["observations"] if row["observations"] else 0.0
        lines.append(f"| {kind} | {row['numel']:,} | {row['spikes']:,} | {rate:.2f} |")
    top = sorted(summary["by_tensor"].items(), key=lambda kv: -kv[1])[:10]
    lines += ["", "Tensors with the most spikes:", ""] + [f"- `{n}`: {c:,}" for n, c in top if c]
    if summary["by_depth"]:
        lines += ["", "Spikes by block depth: " + ", ".join(
            f"{'—' if d is None else d}: {c:,}" for d, c in sorted(summary["by_depth"].items(),
                                                                   key=lambda kv: (kv[0] is None, kv[0] or 0)))]
    lines += ["", f"Optimizer: {summary['clipped']:,} coordinates clipped, resets at steps "
              f"{summary['resets'] or 'none'}, skipped steps {summary['skipped'] or 'none'}.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in images]
    lines += _loss_spike_section(records, summary, run_dir)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
