"""The documents' ``spamopt train`` and ``spamopt compare`` commands run as written on tiny settings: each keeps
its own options (optimizers and their arguments, learning rate, --spikes, --forensics, --compile, ...) and only
its sizes, data and folders are replaced (tiny model, 2 steps, the test corpus, a temporary folder). Commands
whose memory budget depends on the model's size (--match-memory) are checked by
``tests/test_documented_commands.py`` instead; those naming GaLore need galore-torch."""

from __future__ import annotations

import importlib.util

import pytest

from spamopt.cli import main

from ...test_documented_commands import COMMANDS

SIZES = {"--model": "tiny", "--steps": "2", "--seq-len": "32", "--batch-size": "4", "--vocab-size": "300",
         "--eval-tokens": "512", "--warmup-steps": "1", "--eval-every": "0", "--checkpoint-every": "0",
         "--workers": "1"}
DROPPED = {"--micro-batch-size", "--max-train-tokens", "--data", "--cache-dir", "--run-dir", "--out-dir",
           "--parallel"}
RUNS = [(document, argv) for document, argv in COMMANDS
        if argv[0] in ("train", "compare") and "--help" not in argv and "..." not in argv]


def _options(argv: list[str]) -> list[tuple[str, str | None]]:
    """(option, value or None for a flag); train and compare take no positional arguments."""
    pairs, index = [], 0
    while index < len(argv):
        option = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) and not argv[index + 1].startswith("--") else None
        pairs.append((option, value))
        index += 1 if value is None else 2
    return pairs


def tiny(argv: list[str], corpus, cache, out) -> list[str]:
    options = dict(_options(argv[1:]))
    kept = {k: v for k, v in options.items() if k not in DROPPED and k not in SIZES}
    if "--seeds" in kept:
        kept["--seeds"] = kept["--seeds"].split(",")[0]
    folder = "--run-dir" if argv[0] == "train" else "--out-dir"
    changed = {**kept, **SIZES, "--data": str(corpus), "--cache-dir": str(cache), folder: str(out),
               "--no-progress": None}
    if argv[0] == "train":
        del changed["--workers"]
    return [argv[0], *[item for option, value in changed.items() for item in (option, value) if item is not None]]


@pytest.mark.parametrize("document,argv", RUNS, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in RUNS])
def test_a_documented_run_works_on_tiny_settings(document, argv, corpus_dir, token_cache, tmp_path):
    if "--match-memory" in argv:
        pytest.skip("its budget depends on the model's size; validated against its own model elsewhere")
    if "galore" in " ".join(argv) and importlib.util.find_spec("galore_torch") is None:
        pytest.skip("GaLore needs galore-torch (pip install -e '.[galore]')")
    main(tiny(argv, corpus_dir, token_cache, tmp_path / "run"))
    written = "summary.json" if argv[0] == "train" else "report.md"
    assert any(tmp_path.rglob(written)), f"{' '.join(argv)} wrote no {written}"
