"""A run's folder: whether a command may start, continue or replace the run in it, decided before anything is
written, and its ``config.json`` and ``summary.json`` written atomically.

* A folder that holds a run is never reused silently: without ``resume`` or ``overwrite`` the command is
  refused.
* ``resume`` continues the run only under the configuration it was made with; the fields a config class lists
  in ``FREE_ON_RESUME`` (its length, and options that do not change the computation) and :data:`ALWAYS_FREE`
  may differ. Any other difference is refused, naming the fields, unless ``overwrite`` is given too.
* ``overwrite`` removes the earlier run's outputs (and only those) before the new run writes anything.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import MISSING, Field, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT, PREVIOUS, available
from .config import option
from .metrics import METRICS

__all__ = ["CONFIG", "SUMMARY", "ALWAYS_FREE", "RunRefused", "Start", "plan", "begin", "config_differences",
           "read_summary", "write_summary", "write_json_atomically", "resume_option", "overwrite_option"]

CONFIG = "config.json"
SUMMARY = "summary.json"
# What a run writes into its folder; ``overwrite`` removes these and nothing else.
RUN_OUTPUTS = (CONFIG, SUMMARY, METRICS, CHECKPOINT, PREVIOUS, CHECKPOINT + ".tmp", "spikes", "tensorboard",
               "wandb")
_MARKS = (CONFIG, SUMMARY, METRICS, CHECKPOINT, PREVIOUS, "spikes")  # any of these: the folder holds a run
# Where the run lives, how the command treats it, and what it shows while running: never the computation.
ALWAYS_FREE = frozenset({"run_dir", "resume", "overwrite", "progress", "tensorboard", "wandb"})


def resume_option() -> Any:
    """The ``resume`` field of a run's config."""
    return option(False, "continue the run in run_dir from its last checkpoint; refused if its settings differ "
                         "(but for the run's length and options that do not change the computation)")


def overwrite_option() -> Any:
    """The ``overwrite`` field of a run's config."""
    return option(False, "replace the run in run_dir (with --resume: only if its settings differ)")


class RunRefused(ValueError):
    """The command would lose or misreport an earlier run; the message says what to pass instead."""


def _plain(config: Any) -> dict[str, Any]:
    return _plain_value(asdict(config))


def config_differences(stored: dict[str, Any], config: Any) -> dict[str, tuple[Any, Any]]:
    """``{field: (stored value, requested value)}`` for the fields of the dataclass ``config`` that differ from
    the ``stored`` config.json. A field the stored config lacks (added to the class after the run) counts as
    equal when ``config`` holds its default there: the run was made with that behaviour."""
    current = _plain(config)
    differences = {}
    for spec in fields(config):
        if spec.name in stored:
            if stored[spec.name] != current[spec.name]:
                differences[spec.name] = (stored[spec.name], current[spec.name])
        elif not _has_default(spec) or _plain_value(_default(spec)) != current[spec.name]:
            differences[spec.name] = ("(not recorded)", current[spec.name])
    return differences


def _has_default(spec: Field) -> bool:
    return spec.default is not MISSING or spec.default_factory is not MISSING


def _default(spec: Field) -> Any:
    return spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc]


def _plain_value(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's summary, or None when it has none or an unreadable or empty one (an unfinished run)."""
    return _read_json(Path(run_dir) / SUMMARY)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value else None


def write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    write_json_atomically(Path(run_dir) / SUMMARY, summary)


@dataclass(frozen=True)
class Start:
    """How a run begins: ``resume`` from the checkpoint in ``run_dir``, after removing the earlier run's outputs
    when ``clear``."""

    run_dir: Path
    resume: bool
    clear: bool


def _describe(differences: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{name}: {json.dumps(old)} -> {json.dumps(new)}" for name, (old, new) in differences.items())


def plan(config: Any) -> Start:
    """Check what ``config`` (a dataclass with ``run_dir``, ``resume`` and ``overwrite``) asks of its folder,
    writing nothing; raises :class:`RunRefused` when it would lose or falsify the run there."""
    run_dir = Path(config.run_dir)
    present = [name for name in _MARKS if (run_dir / name).exists()]
    if not present:
        return Start(run_dir, resume=False, clear=False)
    stored = _read_json(run_dir / CONFIG)
    differences = None if stored is None else _fixed_differences(stored, config)
    if config.resume and differences == {}:
        resumable = available(run_dir / CHECKPOINT)
        return Start(run_dir, resume=resumable, clear=not resumable)  # no checkpoint yet: begin again at step 0
    if config.overwrite:
        return Start(run_dir, resume=False, clear=True)
    if not config.resume:
        raise RunRefused(f"{run_dir} already holds a run ({', '.join(present)}): pass --resume to continue it, or "
                         "--overwrite to replace it")
    if differences is None:
        raise RunRefused(f"{run_dir} holds a run without a readable {CONFIG}, so --resume cannot check that it "
                         "continues the same run: pass --overwrite to replace it")
    free = sorted(ALWAYS_FREE | set(getattr(type(config), "FREE_ON_RESUME", ())))
    raise RunRefused(f"{run_dir} holds a run made with other settings ({_describe(differences)}); --resume may "
                     f"change only {', '.join(free)}: use another folder, or --overwrite to start it over")


def _fixed_differences(stored: dict[str, Any], config: Any) -> dict[str, tuple[Any, Any]]:
    free = ALWAYS_FREE | set(getattr(type(config), "FREE_ON_RESUME", ()))
    return {k: v for k, v in config_differences(stored, config).items() if k not in free}


def begin(start: Start, config: Any) -> None:
    """Carry out ``start``: remove the earlier run's outputs if asked, create the folder and write
    ``config.json`` (atomically). Call once the run's setup has succeeded, on one process."""
    if start.clear:
        for name in RUN_OUTPUTS:
            path = start.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    start.run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(start.run_dir / CONFIG, _plain(config))
