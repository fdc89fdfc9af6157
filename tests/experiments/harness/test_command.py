"""Families' commands are discovered, not hard-coded: the shipped families' commands are found, and a new family
folder with a ``commands.py`` appears in ``spamopt`` with no change to shared code."""

from __future__ import annotations

import sys

import pytest

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
        "                    lambda args: print('toy', args.size), writes='nothing', example='spamopt toy')]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "families", raising=False)
    commands = discover("families")
    assert [c.path for c in commands] == [("toy",)]
    args = build_parser(LIBRARY_COMMANDS + commands).parse_args(["toy", "--size", "3"])
    assert args.size == 3 and args.run is commands[0].run


def test_every_command_says_what_it_writes_and_gives_an_example_that_parses(capsys):
    """Each subcommand's --help ends with what it writes and one example; the example is a valid command
    line for that subcommand (it parses, so no option is misspelt or missing)."""
    import shlex

    commands = LIBRARY_COMMANDS + discover()
    parser = build_parser(commands)
    for command in commands:
        with pytest.raises(SystemExit):
            parser.parse_args([*command.path, "--help"])
        text = capsys.readouterr().out
        assert f"writes: {command.writes.split()[0]}" in text and command.example.split()[1] in text, command.path
        argv = shlex.split(command.example)
        assert argv[0] == "spamopt" and tuple(argv[1:1 + len(command.path)]) == command.path
        assert parser.parse_args(argv[1:]).run is command.run
