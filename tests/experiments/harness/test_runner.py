"""The optimizers × seeds runner: every (name, seed) runs once in its own folder; a run finished under the same
config is reused; one made with another config is refused before anything runs, naming the run and the field,
and runs again only with ``overwrite``; a run whose summary is unreadable counts as unfinished; parallel
workers run each pending run once, in processes of one thread; lists and labels are parsed with clear errors."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from spamopt.experiments.harness.rundir import RunRefused
from spamopt.experiments.harness.runner import finished, parse_labelled, parse_list, run_grid, run_jobs


@dataclass
class Job:
    name: str
    seed: int
    run_dir: str
    size: int = 1
    resume: bool = True  # as the families' grids set it
    overwrite: bool = False


def _execute(calls):
    def execute(job: Job) -> None:
        calls.append((job.name, job.seed))
        from pathlib import Path

        directory = Path(job.run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(asdict(job)))
        (directory / "summary.json").write_text('{"done": true}')
    return execute


def test_each_run_once_then_reused_until_its_config_changes(tmp_path, capsys):
    """Each (name, seed) runs once; a rerun reuses the finished runs and names each on the output (a rerun
    that trains nothing says so); another config is refused, naming run and field; ``overwrite`` runs again."""
    calls: list = []
    make = lambda name, seed, directory: Job(name, seed, str(directory))  # noqa: E731
    run_grid(tmp_path, ["a", "b"], [0, 1], make, _execute(calls))
    assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert not [line for line in capsys.readouterr().out.splitlines() if line.endswith(", reused")]
    assert finished(tmp_path / "a" / "seed1", Job("a", 1, str(tmp_path / "a" / "seed1")))
    calls.clear()
    run_grid(tmp_path, ["a", "b"], [0, 1], make, _execute(calls))
    assert calls == []
    reused = [line for line in capsys.readouterr().out.splitlines() if line.endswith(", reused")]
    assert len(reused) == 4 and str(tmp_path / "b" / "seed1") in reused[-1]
    changed = lambda name, seed, directory: Job(name, seed, str(directory), size=2)  # noqa: E731
    with pytest.raises(RunRefused, match=r"2 runs cannot .*a/seed0 holds a run made with other settings "
                                         r"\(size: 1 -> 2\).*a/seed1"):
        run_grid(tmp_path, ["a"], [0, 1], changed, _execute(calls))
    assert calls == []
    overwrite = lambda name, seed, directory: Job(name, seed, str(directory), size=2, overwrite=True)  # noqa: E731
    run_grid(tmp_path, ["a"], [0], overwrite, _execute(calls))
    assert calls == [("a", 0)]


@pytest.mark.parametrize("summary", ["", "{}", '{"val_perpl', "[1]"])
def test_a_run_with_an_unreadable_summary_is_unfinished(tmp_path, summary):
    """A summary cut short, empty or not an object (a kill or a full disk while it was written by an older
    version) does not make the run count as finished: it is run (resumed) again."""
    calls: list = []
    make = lambda name, seed, directory: Job(name, seed, str(directory))  # noqa: E731
    run_grid(tmp_path, ["a"], [0], make, _execute(calls))
    (tmp_path / "a" / "seed0" / "summary.json").write_text(summary)
    assert not finished(tmp_path / "a" / "seed0", Job("a", 0, str(tmp_path / "a" / "seed0")))
    run_grid(tmp_path, ["a"], [0], make, _execute(calls))
    assert calls == [("a", 0), ("a", 0)]


@dataclass
class LaterJob(Job):
    """``Job`` after a release added a field."""

    nullify: bool = False


def test_a_field_added_later_reads_as_its_default_in_older_runs(tmp_path):
    """A run recorded before a field existed is reused when the field holds its default (the run had that
    behaviour), and runs again when the field asks for something else."""
    calls: list = []
    run_grid(tmp_path, ["a"], [0], lambda name, seed, directory: Job(name, seed, str(directory)), _execute(calls))
    directory = tmp_path / "a" / "seed0"
    assert finished(directory, LaterJob("a", 0, str(directory)))
    assert not finished(directory, LaterJob("a", 0, str(directory), nullify=True))
    assert not finished(directory, LaterJob("a", 0, str(directory), size=2))


def test_lists_are_parsed_and_an_empty_one_is_refused():
    assert parse_list("seeds", " 0, 1,2 ", int) == [0, 1, 2]
    with pytest.raises(ValueError, match="Invalid optimizers value: ' , '"):
        parse_list("optimizers", " , ")


def record_process(job: Job) -> None:
    """A module-level job (workers pickle it): writes its config and, as its summary, where and how it ran."""
    import torch

    directory = Path(job.run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(asdict(job)))
    (directory / "summary.json").write_text(json.dumps({"pid": os.getpid(), "threads": torch.get_num_threads()}))


def test_parallel_workers_run_each_pending_job_once_in_single_thread_processes(tmp_path):
    jobs = [Job("a", seed, str(tmp_path / "a" / f"seed{seed}")) for seed in range(3)]
    record_process(jobs[0])  # finished already: not run again
    before = (tmp_path / "a" / "seed0" / "summary.json").read_text()
    ran = run_jobs(jobs, record_process, workers=2)
    assert [job.seed for job in ran] == [1, 2]
    assert (tmp_path / "a" / "seed0" / "summary.json").read_text() == before
    summaries = [json.loads((tmp_path / "a" / f"seed{s}" / "summary.json").read_text()) for s in (1, 2)]
    assert all(s["threads"] == 1 and s["pid"] != os.getpid() for s in summaries)
    assert run_jobs(jobs, record_process, workers=2) == []


def test_workers_are_checked(tmp_path, monkeypatch):
    jobs = [Job("a", 0, str(tmp_path / "a"))]
    with pytest.raises(ValueError, match="Invalid workers value: 0"):
        run_jobs(jobs, record_process, workers=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="Invalid workers value: 2 .*torchrun"):
        run_jobs(jobs, record_process, workers=2)


def test_labels_let_one_name_run_twice():
    assert parse_labelled("optimizers", "adamw, sparse-0.25=spam-sparse,spam-sparse") == {
        "adamw": "adamw", "sparse-0.25": "spam-sparse", "spam-sparse": "spam-sparse"}
    for bad in ("a=b,a=c", "x/y=spam", "=spam", "a="):
        with pytest.raises(ValueError, match="Invalid optimizers value"):
            parse_labelled("optimizers", bad)
