"""Command-line commands as data: each family lists its own in ``<family>/commands.py`` as ``COMMANDS``, and
``spamopt`` (``spamopt.cli``) discovers them, so a new family needs no change to shared code."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Command", "discover", "grid_command"]


@dataclass(frozen=True)
class Command:
    """``spamopt <path...>``: ``("train",)``, or ``("spikes", "demo")`` for an action of a command group."""

    path: tuple[str, ...]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    writes: str  # what the command leaves behind, for its --help
    example: str  # one invocation that runs as written, for its --help


def discover(package: str = "spamopt.experiments") -> list[Command]:
    """The ``COMMANDS`` of every family folder (``package.<family>.commands``), families in name order."""
    root = importlib.import_module(package)
    commands: list[Command] = []
    for module in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if not module.ispkg or importlib.util.find_spec(f"{package}.{module.name}.commands") is None:
            continue
        commands += importlib.import_module(f"{package}.{module.name}.commands").COMMANDS
    return commands


def grid_command(name: str, help: str, grid: type, run: type, compare: Callable[[Any, Any], Any],
                 per_run: tuple[str, ...], writes: str, example: str) -> Command:
    """``spamopt <name>`` for a family's grid: the options of ``grid`` (what to compare: optimizers, seeds, ...)
    and of ``run`` less the fields ``compare`` sets per run; runs ``compare(grid, base run)`` and prints the
    report's path."""
    from .config import add_options, from_args
    from .processes import run_command

    def arguments(parser: argparse.ArgumentParser) -> None:
        add_options(parser, grid)
        add_options(parser, run, skip=per_run)

    def execute(args: argparse.Namespace) -> None:
        run_command(lambda: str(compare(from_args(grid, args), from_args(run, args))))

    return Command((name,), help, arguments, execute, writes, example)
