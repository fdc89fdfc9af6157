"""The fine-tuning data: the JSONL reader's errors name the file and line, the response-only labels, the
left-cut prompt, the answer candidates, and the generated task's labels (checked against the arithmetic)."""

from __future__ import annotations

import json
import re

import pytest

from spamopt.experiments.finetune.data import Example, candidates, generate_task, prompt, read_jsonl, response_for
from spamopt.experiments.finetune.train import IGNORE, encode

ITEM = {"instruction": "Pick one. Answer format: option1/option2", "input": "", "output":
        "the correct answer is option2", "answer": "option2"}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_reader_reads_the_llm_adapters_format(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps(ITEM), "", json.dumps({**ITEM, "choices": ["a", "b"]})])
    examples = read_jsonl(path)
    assert len(examples) == 2 and examples[0].answer == "option2" and examples[1].choices == ("a", "b")


@pytest.mark.parametrize("lines, message", [
    ([json.dumps(ITEM), json.dumps({k: v for k, v in ITEM.items() if k != "answer"})],
     r"d\.jsonl:2: field 'answer' missing"),
    ([json.dumps({**ITEM, "output": 3})], r"d\.jsonl:1: field 'output' not a string"),
    ([json.dumps(ITEM), "{not json"], r"d\.jsonl:2: not a JSON object"),
    ([json.dumps([1, 2])], r"d\.jsonl:1: not a JSON object"),
    ([json.dumps({**ITEM, "choices": "ab"})], r"d\.jsonl:1: field 'choices' must be a list"),
    ([], r"d\.jsonl: no examples \(the file is empty\)"),
])
def test_reader_errors_name_the_line(tmp_path, lines, message):
    with pytest.raises(ValueError, match=message):
        read_jsonl(_write(tmp_path / "d.jsonl", lines))


def test_labels_cover_only_the_response_and_long_prompts_are_cut_from_the_left():
    """Prompt tokens carry IGNORE (no loss), response and end token carry themselves; a prompt longer than the
    room left keeps its last tokens, and the response is never cut."""
    ids, labels = encode([1, 2, 3], [7, 8], eos=0, max_length=16)
    assert ids == [1, 2, 3, 7, 8, 0] and labels == [IGNORE] * 3 + [7, 8, 0]
    ids, labels = encode(list(range(10, 30)), [7, 8], eos=0, max_length=8)
    assert ids == [25, 26, 27, 28, 29, 7, 8, 0] and labels == [IGNORE] * 5 + [7, 8, 0]


def test_prompt_is_alpaca_style_with_and_without_input():
    example = Example(**ITEM)
    assert prompt(example).endswith("### Instruction:\n" + ITEM["instruction"] + "\n\n### Response:\n")
    with_input = Example(**{**ITEM, "input": "context"})
    assert "### Input:\ncontext\n\n### Response:\n" in prompt(with_input)


def test_candidates_and_the_response_scored_for_each():
    """Numbered labels share their stem; other labels form one family; ``choices`` wins."""
    pool = [Example(**{**ITEM, "answer": a, "output": f"the correct answer is {a}"})
            for a in ("option1", "option2", "answer3", "answer1", "true", "false")]
    assert candidates(pool[0], pool) == ["option1", "option2"]
    assert candidates(pool[2], pool) == ["answer1", "answer3"]
    assert candidates(pool[4], pool) == ["false", "true"]
    assert candidates(Example(**ITEM, choices=("x", "y")), pool) == ["x", "y"]
    assert response_for(pool[0], "option2") == "the correct answer is option2"


def test_generated_task_is_balanced_and_its_answers_are_right():
    items = generate_task(400, seed=3)
    assert items == generate_task(400, seed=3) and items != generate_task(400, seed=4)
    for item in items:
        numbers = [int(n) for n in re.findall(r"\d{3}", item.instruction)]
        if item.answer.startswith("option"):
            assert item.answer == ("option1" if numbers[0] > numbers[1] else "option2")
        else:
            assert item.answer == ("true" if numbers[0] % 2 == 0 else "false")
        assert item.output == f"the correct answer is {item.answer}"
    answers = [item.answer for item in items]
    assert 80 <= answers.count("option1") <= 120 and 80 <= answers.count("true") <= 120


def test_a_binary_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(b"\x80\x81\xfe\xff" * 16)
    with pytest.raises(ValueError, match=r"items.jsonl is not a UTF-8 JSON-lines file"):
        read_jsonl(path)
