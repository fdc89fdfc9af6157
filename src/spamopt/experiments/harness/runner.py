"""Optimizers × seeds on one base config: each run in ``out_dir/<label>/seed<k>``, resumed when interrupted and
reused when finished, so a grid continues where it stopped. Runs go one after another, or as parallel
single-thread processes (``workers``): on a CPU, independent runs on one core each finish sooner than one run
on every core."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .processes import is_rank_zero
from .rundir import CONFIG, RunRefused, config_differences, plan, read_summary

__all__ = ["parse_list", "parse_labelled", "entry_options", "run_dir", "finished", "refuse_conflicts", "run_jobs",
           "run_grid"]

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def parse_list(name: str, text: str, convert: Callable[[str], Any] = str) -> list[Any]:
    """``"a,b"`` → ``[convert("a"), convert("b")]``; an empty list raises ``ValueError`` naming ``name``."""
    items = [convert(item.strip()) for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"Invalid {name} value: {text!r} (a non-empty comma-separated list)")
    return items


def parse_labelled(name: str, text: str) -> dict[str, str]:
    """``"a,b=c"`` → ``{"a": "a", "b": "c"}``: each entry is ``NAME`` or ``LABEL=NAME``, so one name can run
    twice under different labels (and options). Labels name folders: letters, digits and ``._+-``, unique."""
    entries: dict[str, str] = {}
    for item in parse_list(name, text):
        label, equals, target = item.partition("=")
        label, target = label.strip(), (target.strip() if equals else label.strip())
        if not _LABEL.fullmatch(label) or not target or label in entries:
            raise ValueError(f"Invalid {name} value: {item!r} (NAME or LABEL=NAME; labels unique, of letters, "
                             "digits and ._+-)")
        entries[label] = target
    return entries


def entry_options(optimizer_args: dict[str, dict[str, Any]], label: str, name: str,
                  lr: float) -> tuple[dict[str, Any], float]:
    """The constructor options of entry ``label`` (registry name ``name``): the name's options updated by the
    label's, and the learning rate (an ``lr`` entry overrides ``lr``)."""
    options = {**optimizer_args.get(name, {}), **optimizer_args.get(label, {})}
    return options, options.pop("lr", lr)


def run_dir(out_dir: str | Path, name: str, seed: int) -> Path:
    return Path(out_dir) / name / f"seed{seed}"


def finished(directory: str | Path, config: Any) -> bool:
    """A run is finished when it wrote a readable summary under exactly this config (a dataclass; see
    :func:`~.rundir.config_differences` for fields added since)."""
    directory = Path(directory)
    stored = _stored_config(directory)
    return read_summary(directory) is not None and stored is not None and not config_differences(stored, config)


def _stored_config(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError):
        return None


def refuse_conflicts(configs: list[Any]) -> None:
    """Check every run's folder before any run starts (:func:`~.rundir.plan`): one error names every run that
    would be refused, and why."""
    refusals = []
    for config in configs:
        try:
            plan(config)
        except RunRefused as refusal:
            refusals.append(str(refusal))
    if refusals:
        raise RunRefused(f"{len(refusals)} run{'s' if len(refusals) > 1 else ''} cannot be reused or continued "
                         "under these settings: " + " | ".join(refusals))


def _single_thread(job: tuple[Callable[[Any], Any], Any]) -> str:
    import torch

    from .allocator import keep_freed_memory

    execute, config = job
    torch.set_num_threads(1)  # the workers share the cores: one each
    keep_freed_memory()
    execute(config)
    return config.run_dir


def run_jobs(configs: list[Any], execute: Callable[[Any], Any], workers: int = 1) -> list[Any]:
    """``execute(config)`` for every config (a dataclass with a ``run_dir``) not finished yet, which resumes it
    from its checkpoint; returns the configs that ran. ``workers > 1`` runs them in that many spawned processes
    of one thread each (``execute`` must then be a module-level function)."""
    if workers < 1:
        raise ValueError(f"Invalid workers value: {workers} (must be >= 1)")
    if workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"Invalid workers value: {workers} (parallel workers cannot run under torchrun: use 1)")
    pending, reused = [], []
    for config in configs:
        (reused if finished(config.run_dir, config) else pending).append(config)
    refuse_conflicts(pending)
    if is_rank_zero():  # said, so that a rerun which trains nothing is not taken for a fresh result
        for config in reused:
            print(f"== {config.run_dir}: finished under these settings, reused", flush=True)
    if workers == 1 or len(pending) <= 1:
        for config in pending:
            if is_rank_zero():
                print(f"== {config.run_dir}", flush=True)
            execute(config)
        return pending
    with multiprocessing.get_context("spawn").Pool(min(workers, len(pending))) as pool:
        jobs = [(execute, config) for config in pending]
        for done, directory in enumerate(pool.imap_unordered(_single_thread, jobs), start=1):
            print(f"[{done}/{len(pending)}] {directory}", flush=True)
    return pending


def run_grid(out_dir: str | Path, names: list[str], seeds: list[int], make_run: Callable[[str, int, Path], Any],
             execute: Callable[[Any], Any], workers: int = 1) -> list[Any]:
    """For every (name, seed): ``make_run(name, seed, run_dir)`` gives the run's config (a dataclass written to
    ``config.json`` by ``execute``); :func:`run_jobs` runs those not finished under that config."""
    configs = [make_run(name, seed, run_dir(out_dir, name, seed)) for name in names for seed in seeds]
    return run_jobs(configs, execute, workers)
