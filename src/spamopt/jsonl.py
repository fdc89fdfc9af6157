"""JSON-lines logs (``metrics.jsonl``, ``spikes.jsonl``) read back safely.

A process killed while appending leaves its last line cut short; that record is dropped with a warning, since
the run that resumes writes it again. Any other unreadable line means the file was damaged, and the error names
the file and the line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per non-empty line; a partial last line is dropped with a warning."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a JSON-lines text file ({error})") from None
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if position == len(numbered) - 1:
                warnings.warn(f"{path}: dropped its last line {number}, cut short (a process was killed while "
                              "writing it)", stacklevel=2)
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: not a JSON object")
        records.append(record)
    return records
