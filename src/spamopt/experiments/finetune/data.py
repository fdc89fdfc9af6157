"""Instruction data in the LLM-Adapters / Commonsense170K format, the prompt, the response-only labels, the
answer candidates of a multiple-choice item, and the generated task the embedded default trains on.

A data file is JSON Lines, one object per line with the string fields ``instruction``, ``input`` (may be
empty), ``output`` (the full response, e.g. "the correct answer is option2") and ``answer`` (the label, e.g.
"option2"); an optional ``choices`` list names the item's candidate answers.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Example", "read_jsonl", "write_jsonl", "prompt", "candidates", "response_for", "generate_task",
           "FIELDS"]

FIELDS = ("instruction", "input", "output", "answer")
_NUMBERED = re.compile(r"^([A-Za-z]+)(\d+)$")


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str
    answer: str
    choices: tuple[str, ...] = ()


def read_jsonl(path: str | Path) -> list[Example]:
    """The examples of ``path``; a malformed line raises ``ValueError`` naming the file and line."""
    path = Path(path)
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a UTF-8 JSON-lines file ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        for field in FIELDS:
            if not isinstance(record.get(field), str):
                problem = "missing" if field not in record else "not a string"
                raise ValueError(f"{path}:{number}: field {field!r} {problem} (each line needs "
                                 f"{', '.join(FIELDS)})")
        choices = record.get("choices", [])
        if not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise ValueError(f"{path}:{number}: field 'choices' must be a list of strings")
        examples.append(Example(*(record[field] for field in FIELDS), choices=tuple(choices)))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def write_jsonl(path: str | Path, examples: list[Example]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps({f: getattr(e, f) for f in FIELDS}) + "\n" for e in examples))
    return path


def prompt(example: Example) -> str:
    """LLM-Adapters' (Alpaca's) template; the response follows it."""
    if example.input:
        return ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{example.instruction}\n\n### Input:\n{example.input}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{example.instruction}\n\n### Response:\n")


def _family(answer: str) -> str:
    match = _NUMBERED.match(answer)
    return match.group(1).lower() if match else ""


def candidates(example: Example, pool: list[Example]) -> list[str]:
    """The item's candidate answers: its ``choices``, else every answer in ``pool`` of its family: numbered
    labels share their stem ("option1", "option2", ...; "answer1" ... "answer5"), other labels form one family
    ("true", "false")."""
    if example.choices:
        return list(example.choices)
    family = _family(example.answer)
    return sorted({e.answer for e in pool if _family(e.answer) == family})


def response_for(example: Example, answer: str) -> str:
    """The example's response with ``answer`` in place of its label (the text scored for that candidate)."""
    if example.answer in example.output:
        return example.output.replace(example.answer, answer)
    return answer


def generate_task(count: int, seed: int) -> list[Example]:
    """The embedded default: two kinds of multiple-choice item in Commonsense170K's wording, with verifiable
    answers and balanced labels, half each: which of two 3-digit numbers is larger (option1/option2, as
    WinoGrande's items), and whether a number is even (true/false, as BoolQ's)."""
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        if index % 2 == 0:
            a, b = rng.sample(range(100, 1000), 2)
            answer = "option1" if a > b else "option2"
            instruction = (f"Please choose the larger number. Option1: {a} Option2: {b} "
                           "Answer format: option1/option2")
        else:
            n = rng.randrange(100, 1000)
            answer = "true" if n % 2 == 0 else "false"
            instruction = (f"Please answer the following question with true or false, question: is {n} an even "
                           "number? Answer format: true/false")
        examples.append(Example(instruction, "", f"the correct answer is {answer}", answer))
    return examples
