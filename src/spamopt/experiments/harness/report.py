"""Aggregating a grid of runs: mean ± sample std over seeds, mean curves over seeds, and their plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from spamopt.plotting import pyplot, save

__all__ = ["mean_std", "mean_curve", "plot_curves", "format_mean_std"]

Curve = list[tuple[int, float]]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_mean_std(mean: float, std: float | None, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {'n/a' if std is None else f'{std:.{digits}f}'}"


def mean_curve(records: list[list[dict[str, Any]]], key: str) -> Curve:
    """``(step, mean over runs)`` of ``key`` at the steps every run recorded it."""
    by_step: dict[int, list[float]] = {}
    for run in records:
        for record in run:
            if key in record:
                by_step.setdefault(record["step"], []).append(record[key])
    return [(step, statistics.fmean(v)) for step, v in sorted(by_step.items()) if len(v) == len(records)]


def plot_curves(curves: dict[str, dict[str, Curve]], panels: list[dict[str, Any]], path: Path) -> Path:
    """One panel per entry of ``panels`` (``key``, ``title``, ``ylabel``, optional ``yscale`` and ``marker``),
    one line per name of ``curves`` (name → key → curve); written to ``path``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, series in curves.items():
            if series.get(panel["key"]):
                steps, values = zip(*series[panel["key"]])
                ax.plot(steps, values, marker=panel.get("marker"), label=name)
        ax.set(title=panel["title"], xlabel="step", ylabel=panel["ylabel"], yscale=panel.get("yscale", "linear"))
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)
