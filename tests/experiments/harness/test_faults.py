"""What the harness does with damaged or missing files and with a run folder it may not touch, component by
component: verified checkpoints and the fallback to the previous one, a full disk, non-finite state, run-folder
decisions, JSON-lines logs cut short, and the CLI's one-line errors. The end-to-end versions through
``spamopt train`` / ``compare`` are in ``tests/experiments/lm/test_faults.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from spamopt import SPAM
from spamopt.experiments.harness import checkpoint
from spamopt.experiments.harness.config import json_object
from spamopt.experiments.harness.rundir import RunRefused, begin, plan
from spamopt.jsonl import read_jsonl


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 32)
    optimizer = SPAM(model.parameters(), lr=1e-2)
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(path: Path, model, optimizer, step: int, **extra) -> None:
    checkpoint.save(path, model=model, optimizer=optimizer, rank=0, distributed=False, step=step, **extra)


def _weight_after_load(path: Path) -> tuple[torch.Tensor, dict]:
    fresh, optimizer = _model_and_optimizer(seed=1)
    extra = checkpoint.load(path, model=fresh, optimizer=optimizer, distributed=False)
    return fresh.weight.detach().clone(), extra


def _flip_bytes_inside_a_tensor(path: Path, count: int = 400) -> None:
    """Invert ``count`` bytes in the middle of the largest tensor's record of the zip archive: the file stays a
    readable archive, only a tensor's values change."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_length, extra_length = int.from_bytes(raw[header + 26:header + 28], "little"), int.from_bytes(
        raw[header + 28:header + 30], "little")
    start = header + 30 + name_length + extra_length + info.file_size // 2 - count // 2
    raw[start:start + count] = bytes(255 - b for b in raw[start:start + count])
    path.write_bytes(bytes(raw))


def test_a_checkpoint_corrupted_inside_a_tensor_is_refused_and_the_previous_one_is_used(tmp_path):
    """400 bytes flipped inside a tensor of the newest checkpoint (torch.load still succeeds): the checksum
    catches it, the load warns and restores the previous checkpoint, bit for bit."""
    path = tmp_path / checkpoint.CHECKPOINT
    model, optimizer = _model_and_optimizer()
    _save(path, model, optimizer, step=10)
    first = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    _save(path, model, optimizer, step=20)
    assert (tmp_path / checkpoint.PREVIOUS).exists()
    _flip_bytes_inside_a_tensor(path)
    torch.load(path, weights_only=True)  # still a readable file: only the checksum can tell
    with pytest.warns(UserWarning, match=r"fails its checksum.*resuming from the previous checkpoint"):
        weight, extra = _weight_after_load(path)
    assert extra["step"] == 10 and torch.equal(weight, first)


@pytest.mark.parametrize("content", [b"", b"garbage that is no zip archive", None])
def test_an_empty_garbage_or_missing_newest_checkpoint_falls_back(tmp_path, content):
    """Empty, garbage, or missing (a kill between the two renames): the previous checkpoint is used."""
    path = tmp_path / checkpoint.CHECKPOINT
    model, optimizer = _model_and_optimizer()
    _save(path, model, optimizer, step=1)
    _save(path, model, optimizer, step=2)
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    assert checkpoint.available(path)
    with pytest.warns(UserWarning, match="previous checkpoint"):
        _, extra = _weight_after_load(path)
    assert extra["step"] == 1


def test_when_no_checkpoint_verifies_the_error_names_both_files(tmp_path):
    path = tmp_path / checkpoint.CHECKPOINT
    path.write_bytes(b"")
    (tmp_path / checkpoint.PREVIOUS).write_bytes(b"\x00" * 10)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"checkpoint\.pt is not a readable checkpoint "
                                                                r"\(EOFError.*checkpoint\.prev\.pt is not"):
        _weight_after_load(path)


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    """torch.save fails as it does on a full disk: the error names the file, the temporary is removed and the
    last checkpoint is still the one that loads."""
    path = tmp_path / checkpoint.CHECKPOINT
    model, optimizer = _model_and_optimizer()
    _save(path, model, optimizer, step=1)

    def disk_full(payload, handle):
        handle.write(b"part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*checkpoint\.pt \(is the disk full\?\)"):
        _save(path, model, optimizer, step=2)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert _weight_after_load(path)[1]["step"] == 1


@pytest.mark.parametrize("where", ["parameter", "loss"])
def test_non_finite_state_is_never_checkpointed(tmp_path, where):
    """A NaN parameter or loss raises NonFiniteError naming the step, and the good checkpoint is untouched."""
    path = tmp_path / checkpoint.CHECKPOINT
    model, optimizer = _model_and_optimizer()
    _save(path, model, optimizer, step=5, loss=torch.tensor(2.0))
    before = path.read_bytes()
    loss = torch.tensor(float("nan")) if where == "loss" else torch.tensor(2.0)
    if where == "parameter":
        with torch.no_grad():
            model.bias[3] = float("inf")
    what = "parameter .bias. is" if where == "parameter" else "the loss is"
    with pytest.raises(checkpoint.NonFiniteError, match=f"step 6: {what} not finite"):
        _save(path, model, optimizer, step=6, loss=loss)
    assert path.read_bytes() == before and not (tmp_path / checkpoint.PREVIOUS).exists()


def test_checkpoints_without_a_digest_still_load(tmp_path):
    """Checkpoints written before digests existed load as before (nothing to verify)."""
    model, optimizer = _model_and_optimizer()
    path = tmp_path / checkpoint.CHECKPOINT
    _save(path, model, optimizer, step=3)
    payload = torch.load(path, weights_only=True)
    del payload[checkpoint._DIGEST]
    torch.save(payload, path)
    assert _weight_after_load(path)[1]["step"] == 3


@dataclass
class Run:
    run_dir: str
    lr: float = 1e-3
    steps: int = 10
    resume: bool = False
    overwrite: bool = False
    FREE_ON_RESUME = frozenset({"steps"})


def _begun(tmp_path: Path) -> Run:
    run = Run(str(tmp_path / "run"))
    begin(plan(run), run)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "run" / "notes.txt").write_text("mine")
    return run


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    run = _begun(tmp_path)
    with pytest.raises(RunRefused, match="already holds a run .*pass --resume to continue it, or --overwrite"):
        plan(run)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_resume_refuses_changed_settings_and_allows_the_free_ones(tmp_path):
    _begun(tmp_path)
    with pytest.raises(RunRefused, match=r"other settings \(lr: 0.001 -> 0.01\); --resume may change only .*steps"):
        plan(Run(str(tmp_path / "run"), lr=1e-2, resume=True))
    start = plan(Run(str(tmp_path / "run"), steps=20, resume=True))
    assert not start.resume and start.clear  # the same run, no checkpoint yet: it begins again at step 0


def test_resume_with_overwrite_continues_a_matching_run_and_replaces_a_differing_one(tmp_path):
    _begun(tmp_path)
    (tmp_path / "run" / checkpoint.CHECKPOINT).write_bytes(b"stands for a checkpoint")
    same = plan(Run(str(tmp_path / "run"), steps=20, resume=True, overwrite=True))
    assert same.resume and not same.clear
    other = plan(Run(str(tmp_path / "run"), lr=1e-2, resume=True, overwrite=True))
    assert other.clear and not other.resume


def test_overwrite_removes_the_runs_outputs_and_nothing_else(tmp_path):
    _begun(tmp_path)
    run = Run(str(tmp_path / "run"), lr=1e-2, overwrite=True)
    begin(plan(run), run)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 1e-2


def test_a_partial_last_line_is_dropped_with_a_warning_and_other_damage_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: dropped its last line 3"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON record"):
        read_jsonl(path)
    path.write_bytes(b"\x80\x81\xff")
    with pytest.raises(ValueError, match=r"metrics\.jsonl is not a JSON-lines text file"):
        read_jsonl(path)


def test_json_options_must_be_objects():
    import argparse

    assert json_object('{"a": 1}') == {"a": 1}
    for text, says in (("[1,2]", "is a JSON list"), ("{oops", "is not valid JSON")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            json_object(text)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spamopt.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": ":".join(sys.path), "PATH": "/usr/bin:/bin"})


def test_cli_errors_are_one_line_with_exit_codes_and_debug_shows_the_traceback(tmp_path):
    """A refused input exits 2 with one line; a damaged file to work on exits 1 with one line; --debug shows
    the traceback. The refused command leaves no run folder behind."""
    refused = _cli("train", "--steps", "0", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "spamopt: error: Invalid steps value: 0 (>= 1)"]
    assert not (tmp_path / "run").exists()
    (tmp_path / "spikes.jsonl").write_text("")
    empty = _cli("spikes", "report", str(tmp_path), cwd=tmp_path)
    assert empty.returncode == 2 and len(empty.stderr.strip().splitlines()) == 1
    assert "spikes.jsonl holds no monitor records" in empty.stderr
    traced = _cli("--debug", "spikes", "report", str(tmp_path), cwd=tmp_path)
    assert traced.returncode == 1 and "Traceback" in traced.stderr


@pytest.mark.parametrize("command", [["ts", "--data", "missing.csv"], ["finetune", "--base", "missing"],
                                     ["rl", "--envs", "NoSuchTask-v0", "--timesteps", "10"]])
def test_refused_family_commands_leave_no_run_folder(tmp_path, command):
    """``ts``, ``finetune`` and ``rl`` used to leave a run folder holding only config.json when refused."""
    result = _cli(*command, "--out-dir", "out", cwd=tmp_path)
    assert result.returncode in (1, 2) and result.stderr.strip().splitlines()[-1].startswith("spamopt: error: ")
    assert [path for path in (tmp_path / "out").rglob("*") if path.is_file()] == []


def test_the_cli_says_its_version(tmp_path):
    import spamopt

    result = _cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"spamopt {spamopt.__version__}"
