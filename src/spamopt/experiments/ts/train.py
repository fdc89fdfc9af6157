"""One PatchTST forecasting run, read top to bottom: epochs over shuffled training windows (anomalies injected
into their inputs), validation and test error after every epoch, early stopping on the validation error, an
atomic checkpoint after every epoch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..harness import checkpoint
from ..harness.config import check_fields, option
from ..harness.metrics import Metrics
from ..harness.optimizers import build_optimizer
from ..harness.rundir import begin, overwrite_option, plan, resume_option, write_summary
from .data import DEFAULT_ETT_DIR, Splits, inject_anomalies, load_series, split, window_count, windows
from .model import PatchTSTShape, build_patchtst, patchtst_layout

__all__ = ["TSConfig", "train", "epoch_lr"]


@dataclass
class TSConfig:
    """Everything a run depends on; saved as ``config.json`` in the run directory."""

    data: str = option("ETTh1", "ETTh1, ETTh2 (from --data-dir), nyc-weather, or a CSV path")
    data_dir: str = option(DEFAULT_ETT_DIR, "the folder holding ETTh1.csv and ETTh2.csv")
    date_column: str | None = option(None, "a CSV's date column ('': none); default: the first column when its "
                                           "first value is not a number")
    lookback: int = option(336, "input length (PatchTST: 336)")
    horizon: int = option(96, "forecast length (96, 192, 336 or 720 in the papers)")
    anomaly_fraction: float = option(0.1, "fraction of training input values made anomalous")
    severity: float = option(0.0, "anomaly severity S: X + N(0, S·max|X|); 0 is clean data")
    optimizer: str = option("adam", "a registry name: adam, adamw, spam, stable-spam, ...")
    optimizer_args: dict[str, Any] = option(dict, "JSON object passed to the optimizer's constructor")
    lr: float = option(1e-4, "learning rate (PatchTST: 1e-4), kept for 4 epochs then × 0.9 per epoch")
    batch_size: int = option(128, "windows per step")
    epochs: int = option(20, "training epochs")
    patience: int = option(5, "stop after this many epochs without a better validation error; 0: train "
                              "every epoch (the papers' curves)")
    seed: int = option(0, "seed of the weights, the batch order and the anomalies")
    run_dir: str = option("runs/ts/run", "where config, metrics, checkpoint and summary go")
    resume: bool = resume_option()
    overwrite: bool = overwrite_option()

    # What --resume may change: how long the run goes on, and where the ETT files are found.
    FREE_ON_RESUME: ClassVar[frozenset[str]] = frozenset({"epochs", "patience", "data_dir"})

    def __post_init__(self) -> None:
        check_fields(self, {
            "lookback": (self.lookback >= 16, ">= 16 (one patch)"),
            "horizon": (self.horizon >= 1, ">= 1"),
            "anomaly_fraction": (0 <= self.anomaly_fraction <= 1, "in [0, 1]"),
            "severity": (self.severity >= 0, ">= 0"),
            "lr": (self.lr > 0, "> 0"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "epochs": (self.epochs >= 1, ">= 1"),
            "patience": (self.patience >= 0, ">= 0 (0: no early stopping)"),
        })


def epoch_lr(lr: float, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under PatchTST's ``type3`` schedule as its training loop
    applies it: after epoch ``e`` it sets ``lr·(1 if e + 1 < 3 else 0.9^(e + 1 − 3))`` for the next one, so
    the base rate holds for epochs 0–3, then × 0.9 per epoch."""
    return lr if epoch < 4 else lr * 0.9 ** (epoch - 3)


@torch.no_grad()
def evaluate(model: torch.nn.Module, array: np.ndarray, config: TSConfig) -> tuple[float, float]:
    """MSE and MAE over every window of ``array`` (standardised units, as the papers report)."""
    model.eval()
    count = window_count(array, config.lookback, config.horizon)
    squared = absolute = 0.0
    for first in range(0, count, 512):
        x, y = windows(array, config.lookback, config.horizon, np.arange(first, min(first + 512, count)))
        prediction = model(past_values=torch.from_numpy(x)).prediction_outputs
        target = torch.from_numpy(y)
        squared += F.mse_loss(prediction, target, reduction="sum").item()
        absolute += F.l1_loss(prediction, target, reduction="sum").item()
    model.train()
    size = count * config.horizon * array.shape[1]
    return squared / size, absolute / size


def _train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Splits, config: TSConfig,
                 epoch: int) -> float:
    """One pass over the training windows in a seeded order; returns the mean training loss (on the
    corrupted inputs the model sees)."""
    count = window_count(data.train, config.lookback, config.horizon)
    order = np.random.default_rng([config.seed, epoch]).permutation(count)
    total = 0.0
    for first in range(0, count, config.batch_size):
        index = order[first:first + config.batch_size]
        x, y = windows(data.train, config.lookback, config.horizon, index)
        x = inject_anomalies(x, index, config.anomaly_fraction, config.severity, config.seed)
        loss = F.mse_loss(model(past_values=torch.from_numpy(x)).prediction_outputs, torch.from_numpy(y))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item() * len(index)
    return total / count


def train(config: TSConfig) -> dict[str, Any]:
    """Train, evaluate every epoch, stop early (or not), checkpoint; returns and writes ``summary.json``."""
    start = plan(config)
    series = load_series(config.data, config.data_dir, config.date_column)
    data = split(series, config.lookback, config.horizon)

    torch.manual_seed(config.seed)
    shape = PatchTSTShape()
    model = build_patchtst(len(series.columns), config.lookback, config.horizon, shape)
    optimizer = build_optimizer(config.optimizer, model, patchtst_layout(shape), lr=config.lr,
                                options=config.optimizer_args).optimizer
    begin(start, config)
    path = start.run_dir / checkpoint.CHECKPOINT
    state: dict[str, Any] = {"epoch": 0, "best": None, "stale": 0}
    if start.resume:
        saved = checkpoint.load(path, model=model, optimizer=optimizer, distributed=False)
        state = saved["progress"]
        torch.set_rng_state(saved["rng"])
    metrics = Metrics(start.run_dir, config=asdict(config), resumed_step=state["epoch"])
    try:
        _epochs(config, model, optimizer, data, state, metrics, path)
        stopped = None
    except checkpoint.NonFiniteError as error:  # diverged: the last good checkpoint stays, the run ends here
        stopped = error
    metrics.close()
    summary = {"optimizer": config.optimizer, "seed": config.seed, "severity": config.severity,
               "data": series.name, "channels": len(series.columns), "columns": series.columns,
               "ignored_columns": series.ignored,
               "epochs_run": state["epoch"], "best": state["best"], "last": state["last"],
               "parameters": sum(p.numel() for p in model.parameters())}
    if stopped is not None or not all(math.isfinite(v) for v in summary["best"].values()):
        summary["diverged"] = True
    if stopped is not None:
        summary.update(stopped_at_epoch=stopped.step, stopped=str(stopped))
    write_summary(start.run_dir, summary)
    return summary


def _epochs(config: TSConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: Splits,
            state: dict[str, Any], metrics: Metrics, path: Path) -> None:
    """Train from epoch ``state["epoch"]`` on, updating ``state`` and checkpointing after every epoch."""
    for epoch in range(state["epoch"], config.epochs):
        if config.patience and state["stale"] >= config.patience:
            break
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config.lr, epoch)
        train_loss = _train_epoch(model, optimizer, data, config, epoch)
        val_mse, _ = evaluate(model, data.validation, config)
        test_mse, test_mae = evaluate(model, data.test, config)
        metrics.log(epoch + 1, train_loss=train_loss, val_mse=val_mse, test_mse=test_mse, test_mae=test_mae,
                    lr=epoch_lr(config.lr, epoch))
        if state["best"] is None or val_mse < state["best"]["val_mse"]:
            state["best"] = {"epoch": epoch + 1, "val_mse": val_mse, "test_mse": test_mse, "test_mae": test_mae}
            state["stale"] = 0
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        state["last"] = {"epoch": epoch + 1, "val_mse": val_mse, "test_mse": test_mse, "test_mae": test_mae}
        checkpoint.save(path, model=model, optimizer=optimizer, rank=0, distributed=False, step=epoch + 1,
                        loss=train_loss, progress=state, rng=torch.get_rng_state())
