"""``spamopt <command>``: parses arguments, then calls one function. The library's own command (``spikes
report``) is here; every experiment family's commands are discovered from ``spamopt.experiments``.

A failing command prints one line, ``spamopt: error: ...``, and exits with 2 when the input was refused (a bad
value, a missing file, a run folder it may not touch) and 1 when the work failed; ``--debug`` or
``SPAMOPT_DEBUG=1`` shows the traceback instead."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from spamopt import __version__
from spamopt.experiments.harness.allocator import keep_freed_memory
from spamopt.experiments.harness.command import Command, discover

GROUP_HELP = {"spikes": "gradient-spike telemetry"}


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path)


def _report(args: argparse.Namespace) -> None:
    from spamopt.spikes.report import build_report

    print(build_report(args.run_dir))


LIBRARY_COMMANDS = [Command(("spikes", "report"), "plots and a markdown summary of a monitored run",
                            _report_arguments, _report,
                            writes="RUN_DIR/report.md and its PNG plots: loss and spikes, spikes by layer type, a "
                                   "heatmap per tensor, the GSS histogram, and one figure per loss spike",
                            example="spamopt spikes report runs/train/spikes")]


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    """One subcommand per command; a two-word path makes a command group (``spamopt spikes report``)."""
    parser = argparse.ArgumentParser(prog="spamopt", description="SPAM optimizer tools")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"spamopt {__version__}")
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
        sub = subparsers.add_parser(name, help=command.help, description=command.help,
                                    epilog=f"writes: {command.writes}\n\nexample:\n  {command.example}",
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


# Errors in what the user asked for (exit 2); any other exception is a failure of the work (exit 1).
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def _run(args: argparse.Namespace) -> None:
    keep_freed_memory()  # before the run allocates anything large
    args.run(args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser(LIBRARY_COMMANDS + discover()).parse_args(argv)
    if args.debug or os.environ.get("SPAMOPT_DEBUG", "") not in ("", "0"):
        _run(args)
        return
    try:
        _run(args)
    except KeyboardInterrupt:
        print("spamopt: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 (one line for every error; --debug shows the traceback)
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"spamopt: error: {message}", file=sys.stderr)
        sys.exit(2 if isinstance(error, USAGE_ERRORS) else 1)


if __name__ == "__main__":
    main()
