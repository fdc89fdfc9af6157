"""benchmarks/claims.py, which REPRODUCTION.md's intervals come from: the paired difference, its Student-t
interval and verdict match a hand computation (and scipy's t quantile), labels may name folders of other
experiments, and a diverged run is reported as such instead of as a number."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def claims():
    spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs(root: Path, label: str, losses: list[float]) -> None:
    for seed, loss in enumerate(losses):
        directory = root / label / f"seed{seed}"
        directory.mkdir(parents=True)
        (directory / "summary.json").write_text(json.dumps({"seed": seed, "val_loss": loss}))


def test_paired_interval_and_verdict(claims, tmp_path):
    _runs(tmp_path, "exp/a", [4.0, 4.1, 4.3])
    _runs(tmp_path, "other/b", [4.1, 4.25, 4.38])
    result = claims.paired(tmp_path, "exp/a", "other/b")
    diffs = [-0.1, -0.15, -0.08]
    half = 4.303 * statistics.stdev(diffs) / math.sqrt(3)
    assert result["loss_differences"] == pytest.approx(diffs)
    assert result["ci95"] == pytest.approx([statistics.fmean(diffs) - half, statistics.fmean(diffs) + half])
    assert result["verdict"] == "exp/a better"
    scipy_stats = pytest.importorskip("scipy.stats")
    assert claims.T95[2] == pytest.approx(scipy_stats.t.ppf(0.975, 2), abs=1e-3)


def test_a_diverged_run_is_reported_not_averaged(claims, tmp_path):
    _runs(tmp_path, "a", [4.0, float("nan")])
    _runs(tmp_path, "b", [4.1, 4.2])
    assert claims.paired(tmp_path, "a", "b")["verdict"] == "a run diverged (non-finite loss)"
