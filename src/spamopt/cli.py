"""``spamopt <command>``: parses arguments, then calls one function. The library's own command (``spikes
report``) is here; every experiment family's commands are discovered from ``spamopt.experiments``."""

from __future__ import annotations

import argparse
from pathlib import Path

from spamopt.experiments.harness.command import Command, discover

GROUP_HELP = {"spikes": "gradient-spike telemetry"}


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path)


def _report(args: argparse.Namespace) -> None:
    from spamopt.spikes.report import build_report

    print(build_report(args.run_dir))


LIBRARY_COMMANDS = [Command(("spikes", "report"), "plots and a markdown summary of a monitored run",
                            _report_arguments, _report)]


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    """One subcommand per command; a two-word path makes a command group (``spamopt spikes report``)."""
    parser = argparse.ArgumentParser(prog="spamopt", description="SPAM optimizer tools")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in commands:
        *group, name = command.path
        if group:
            if group[0] not in groups:
                holder = top.add_parser(group[0], help=GROUP_HELP.get(group[0]))
                groups[group[0]] = holder.add_subparsers(dest="action", required=True)
            subparsers = groups[group[0]]
        else:
            subparsers = top
        sub = subparsers.add_parser(name, help=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser(LIBRARY_COMMANDS + discover()).parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
