"""Families' commands are discovered, not hard-coded: the shipped families' commands are found, and a new family
folder with a ``commands.py`` appears in ``spamopt`` with no change to shared code."""

from __future__ import annotations

import sys

from spamopt.cli import LIBRARY_COMMANDS, build_parser
from spamopt.experiments.harness.command import discover


def test_the_shipped_families_are_discovered():
    paths = {command.path for command in discover()}
    assert {("train",), ("compare",), ("spikes", "demo")} <= paths


def test_a_new_family_needs_only_its_own_folder(tmp_path, monkeypatch):
    family = tmp_path / "families" / "toy"
    family.mkdir(parents=True)
    (tmp_path / "families" / "__init__.py").write_text("")
    (family / "__init__.py").write_text("")
    (family / "commands.py").write_text(
        "from spamopt.experiments.harness.command import Command\n"
        "COMMANDS = [Command(('toy',), 'a toy family', lambda p: p.add_argument('--size', type=int),\n"
        "                    lambda args: print('toy', args.size))]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "families", raising=False)
    commands = discover("families")
    assert [c.path for c in commands] == [("toy",)]
    args = build_parser(LIBRARY_COMMANDS + commands).parse_args(["toy", "--size", "3"])
    assert args.size == 3 and args.run is commands[0].run
