"""The documents' commands run as written on tiny settings: each keeps its own options (optimizers and their
arguments, learning rates, severities, --spikes, --forensics, --compile, ...) and only its sizes, data and
folders are replaced (a tiny model, Hopper for any MuJoCo task, a few steps or one epoch, test data, a
temporary folder, the first seed and severity). Not run: commands whose memory budget depends on the model's
size (``--match-memory``; ``tests/test_documented_commands.py`` checks them against their own model), those
naming files only the reader has, and GaLore's without galore-torch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from spamopt.cli import main

from ..test_documented_commands import COMMANDS

SIZES = {
    "train": {"--model": "tiny", "--steps": "2", "--seq-len": "32", "--batch-size": "4", "--vocab-size": "300",
              "--eval-tokens": "512", "--warmup-steps": "1", "--eval-every": "0", "--checkpoint-every": "0"},
    "ts": {"--lookback": "32", "--horizon": "8", "--batch-size": "64", "--epochs": "1", "--workers": "1"},
    "rl": {"--envs": "Hopper-v5", "--timesteps": "512", "--eval-interval": "512", "--eval-episodes": "1",
           "--workers": "1"},
    "finetune": {"--train-items": "100", "--eval-items": "10", "--steps": "2", "--warmup-steps": "1",
                 "--batch-size": "8", "--max-length": "96", "--eval-every": "2", "--workers": "1"},
}
SIZES["compare"] = {**SIZES["train"], "--workers": "1"}
REPLACED = {"--data", "--data-dir", "--cache-dir", "--run-dir", "--out-dir", "--base", "--micro-batch-size",
            "--max-train-tokens", "--parallel"}
FIRST_ONLY = ("--seeds", "--severities")
RUNS = list({tuple(argv): (document, argv) for document, argv in COMMANDS  # each distinct command once
             if argv[0] in SIZES and "--help" not in argv and "..." not in argv
             and not any("$" in a for a in argv)}.values())
WRITES = {"train": "summary.json", "compare": "report.md", "ts": "report.md", "rl": "report.md",
          "finetune": "report.md"}


def _options(argv: list[str]) -> dict[str, str | None]:
    """option -> value (None for a flag); these commands take no positional arguments."""
    options, index = {}, 0
    while index < len(argv):
        value = argv[index + 1] if index + 1 < len(argv) and not argv[index + 1].startswith("--") else None
        options[argv[index]] = value
        index += 1 if value is None else 2
    return options


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The test corpus and a token cache, a small series, and a tiny LLaMA pre-trained for 10 steps."""
    from spamopt.experiments.lm.train import TrainConfig, train

    from .lm.helpers import write_corpus
    from .ts.test_data import write_series

    root = tmp_path_factory.mktemp("documented")
    (root / "corpus").mkdir()
    corpus = write_corpus(root / "corpus")
    base = TrainConfig(model="tiny", data=str(corpus), vocab_size=512, cache_dir=str(root / "base-cache"),
                       seq_len=32, batch_size=8, steps=10, warmup_steps=2, eval_every=0, eval_tokens=1024,
                       run_dir=str(root / "base"), progress=False)
    train(base)
    return {"corpus": corpus, "cache": root / "cache", "series": write_series(root / "series.csv", 600),
            "base": Path(base.run_dir)}


def tiny(argv: list[str], data: dict[str, Path], out: Path) -> list[str] | None:
    """``argv`` with its sizes, data and folders replaced; None when it needs files only its reader has."""
    command, options = argv[0], _options(argv[1:])
    if command == "finetune" and any(k in options for k in ("--data", "--eval-data")):
        return None  # the reader's own JSONL files
    kept = {k: v for k, v in options.items() if k not in REPLACED and k not in SIZES[command]}
    for option in FIRST_ONLY:
        if option in kept:
            kept[option] = kept[option].split(",")[0]
    if command != "train":
        kept.setdefault("--seeds", "0")
    where = {"train": {"--data": data["corpus"], "--cache-dir": data["cache"], "--run-dir": out},
             "compare": {"--data": data["corpus"], "--cache-dir": data["cache"], "--out-dir": out},
             "ts": {"--data": data["series"], "--out-dir": out},
             "rl": {"--out-dir": out},
             "finetune": {"--base": data["base"], "--out-dir": out}}[command]
    flags = {"--no-progress": None} if command in ("train", "compare") else {}
    changed = {**kept, **SIZES[command], **{k: str(v) for k, v in where.items()}, **flags}
    return [command, *[item for option, value in changed.items() for item in (option, value) if item is not None]]


@pytest.mark.parametrize("document,argv", RUNS, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in RUNS])
def test_a_documented_command_runs_on_tiny_settings(document, argv, data, tmp_path):
    if "--match-memory" in argv:
        pytest.skip("its budget depends on the model's size; validated against its own model elsewhere")
    if "galore" in " ".join(argv) and importlib.util.find_spec("galore_torch") is None:
        pytest.skip("GaLore needs galore-torch (pip install -e '.[galore]')")
    small = tiny(argv, data, tmp_path / "run")
    if small is None:
        pytest.skip("it names data files only its reader has")
    main(small)
    assert any(tmp_path.rglob(WRITES[argv[0]])), f"{' '.join(small)} wrote no {WRITES[argv[0]]}"


def test_every_family_has_a_documented_command_that_runs():
    assert {argv[0] for _, argv in RUNS} == set(SIZES)
