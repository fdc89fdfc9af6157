"""The optimizers × seeds runner: every (name, seed) runs once in its own folder; a run finished under the same
config is reused, one with another config runs again; lists are parsed with clear errors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pytest

from spamopt.experiments.harness.runner import finished, parse_list, run_grid


@dataclass
class Job:
    name: str
    seed: int
    run_dir: str
    size: int = 1


def _execute(calls):
    def execute(job: Job) -> None:
        calls.append((job.name, job.seed))
        from pathlib import Path

        directory = Path(job.run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(asdict(job)))
        (directory / "summary.json").write_text("{}")
    return execute


def test_each_run_once_then_reused_until_its_config_changes(tmp_path):
    calls: list = []
    make = lambda name, seed, directory: Job(name, seed, str(directory))  # noqa: E731
    run_grid(tmp_path, ["a", "b"], [0, 1], make, _execute(calls))
    assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert finished(tmp_path / "a" / "seed1", Job("a", 1, str(tmp_path / "a" / "seed1")))
    calls.clear()
    run_grid(tmp_path, ["a", "b"], [0, 1], make, _execute(calls))
    assert calls == []
    run_grid(tmp_path, ["a"], [0], lambda name, seed, directory: Job(name, seed, str(directory), size=2),
             _execute(calls))
    assert calls == [("a", 0)]


def test_lists_are_parsed_and_an_empty_one_is_refused():
    assert parse_list("seeds", " 0, 1,2 ", int) == [0, 1, 2]
    with pytest.raises(ValueError, match="Invalid optimizers value: ' , '"):
        parse_list("optimizers", " , ")
