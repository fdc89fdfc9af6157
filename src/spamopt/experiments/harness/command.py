"""Command-line commands as data: each family lists its own in ``<family>/commands.py`` as ``COMMANDS``, and
``spamopt`` (``spamopt.cli``) discovers them, so a new family needs no change to shared code."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Command", "discover"]


@dataclass(frozen=True)
class Command:
    """``spamopt <path...>``: ``("train",)``, or ``("spikes", "demo")`` for an action of a command group."""

    path: tuple[str, ...]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


def discover(package: str = "spamopt.experiments") -> list[Command]:
    """The ``COMMANDS`` of every family folder (``package.<family>.commands``), families in name order."""
    root = importlib.import_module(package)
    commands: list[Command] = []
    for module in sorted(pkgutil.iter_modules(root.__path__), key=lambda m: m.name):
        if not module.ispkg or importlib.util.find_spec(f"{package}.{module.name}.commands") is None:
            continue
        commands += importlib.import_module(f"{package}.{module.name}.commands").COMMANDS
    return commands
