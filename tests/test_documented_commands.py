"""Every ``spamopt`` command the documents show is a valid command line: it parses with the real CLI (no
misspelt option, no value the option refuses), and a ``compare --match-memory`` budget fits its model. The
commands are read from the fenced code blocks and inline code spans of README.md, docs/*.md, BENCHMARKS.md and
REPRODUCTION.md (continuation lines joined, comments dropped)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from spamopt.cli import LIBRARY_COMMANDS, build_parser
from spamopt.experiments.harness.command import discover

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "REPRODUCTION.md",
             *sorted((ROOT / "docs").glob("*.md"))]


def _logical_lines(block: str) -> list[str]:
    """Shell lines of a code block: backslash continuations joined, and a quoted argument that spans lines
    kept whole."""
    lines, pending = [], ""
    # comments first (two spaces and a hash, or a whole line): an apostrophe in one is not a quote
    block = "\n".join(re.sub(r"(^|\s{2,})#.*$", "", line) for line in block.splitlines())
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.count("'") % 2 == 0:
            lines.append(pending)
            pending = ""
    return lines


def documented_commands() -> list[tuple[str, list[str]]]:
    """``(document, argv after "spamopt")`` for each ``spamopt`` command in a fenced shell code block."""
    found = []
    for document in DOCUMENTS:
        blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", document.read_text(encoding="utf-8"), flags=re.S)
        for block in blocks:
            for line in _logical_lines(block):
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:
                    continue  # not shell (a Python or JSON line)
                command: list[str] = []
                for token in tokens + [";"]:
                    if token in ("&&", ";", "|"):
                        if command:
                            found.append((document.name, command))
                        command = []
                    elif command or token in ("spamopt", "spamopt.cli"):
                        command.append(token)
        # inline code spans that are whole commands, `spamopt ...` in running text
        text = re.sub(r"```.*?```", "", document.read_text(encoding="utf-8"), flags=re.S)
        for span in re.findall(r"`(spamopt [^`]+)`", text.replace("\n", " ")):
            if "--" not in span or "<" in span or "..." in span:
                continue  # naming a command in passing, not a command line
            try:
                found.append((document.name, shlex.split(span)))
            except ValueError:
                continue
    return [(d, c[1:]) for d, c in found if len(c) > 1]


COMMANDS = documented_commands()


def test_the_documents_show_commands():
    names = {argv[0] for _, argv in COMMANDS}
    assert {"train", "compare", "ts", "rl", "finetune", "spikes"} <= names


@pytest.mark.parametrize("document,argv", COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in COMMANDS])
def test_a_documented_command_is_valid(document, argv):
    argv = [a for a in argv if a != "..."]
    if any("$" in a for a in argv):
        pytest.skip("a shell variable stands in for a value")
    parser = build_parser(LIBRARY_COMMANDS + discover())
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit:
            parser.parse_args(argv)
        assert exit.value.code == 0
        return
    args = parser.parse_args(argv)
    if argv[0] == "compare" and args.match_memory:
        from spamopt.experiments.lm.compare import matched_memory

        matched_memory(args.match_memory, args.model, args.match_masks)  # raises if the budget cannot fit
