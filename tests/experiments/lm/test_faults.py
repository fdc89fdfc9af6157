"""``spamopt train`` and ``compare`` under a new user's ordinary mistakes and a machine's faults: nothing earlier
runs wrote is lost, and no result is reported under settings it was not made with.

The runs here use a constant learning rate (no warmup, floor 1×) where a test changes ``steps``, so that the
schedule cannot depend on the run's length and a resumed run must equal an uninterrupted one bit for bit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from spamopt.experiments.harness import checkpoint
from spamopt.experiments.harness.rundir import RunRefused
from spamopt.experiments.lm import train as lm_train
from spamopt.experiments.lm.compare import CompareConfig, compare
from spamopt.experiments.lm.train import TrainConfig, train

from ..harness.resume import assert_same_checkpoint
from ..harness.test_faults import _flip_bytes_inside_a_tensor


def _constant_lr(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, warmup_steps=0, min_lr_ratio=1.0, optimizer="adamw", **changes)


def _records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _files(run_dir: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(run_dir).iterdir() if p.is_file()}


def test_rerunning_without_resume_is_refused_and_the_run_is_untouched(small_run):
    """Item: the same command again without --resume used to empty metrics.jsonl and replace the checkpoint."""
    train(small_run)
    before = _files(small_run.run_dir)
    with pytest.raises(RunRefused, match="already holds a run .*--resume.*--overwrite"):
        train(small_run)
    assert _files(small_run.run_dir) == before
    train(replace(small_run, overwrite=True, steps=4))
    assert _records(small_run.run_dir)[-1]["step"] == 4


@pytest.mark.parametrize("change", [{"lr": 1e-2}, {"optimizer_args": {"eps": 1e-6}}, {"seed": 1},
                                    {"batch_size": 4}, {"seq_len": 16}, {"model": "mini"}, {"optimizer": "spam"}])
def test_resume_with_other_settings_is_refused_before_anything_is_written(small_run, change):
    """A changed lr or optimizer option used to be ignored silently (the checkpoint's won) while config.json
    recorded it; a changed seed, batch or length changed the data mid-run; a changed model or optimizer failed
    with torch's size-mismatch error after config.json was overwritten. Now each is refused, naming the field,
    and the folder is left byte for byte as it was."""
    base = replace(small_run, optimizer="adamw", steps=3)
    train(base)
    before = _files(base.run_dir)
    field = next(iter(change))
    with pytest.raises(RunRefused, match=rf"other settings \({field}: "):
        train(replace(base, resume=True, **change))
    assert _files(base.run_dir) == before


def test_resume_may_change_the_length_and_the_cadences_without_changing_the_result(small_run, tmp_path):
    """--steps extends a run; eval, log and checkpoint cadences may change on resume: the final weights and
    optimizer state equal those of a run that went the whole way with the original cadences."""
    whole = _constant_lr(small_run, steps=8, run_dir=str(tmp_path / "whole"))
    train(whole)
    part = replace(whole, steps=5, run_dir=str(tmp_path / "part"))
    train(part)
    train(replace(part, steps=8, resume=True, eval_every=2, log_every=3, checkpoint_every=1))
    assert_same_checkpoint(Path(whole.run_dir) / "checkpoint.pt", Path(part.run_dir) / "checkpoint.pt")


def test_extending_a_run_follows_the_new_length_of_the_cosine_schedule(small_run):
    """A 5-step run resumed with --steps 8: steps 6-8 use the learning rate of an 8-step schedule."""
    from spamopt.experiments.harness.schedule import lr_multiplier

    part = replace(small_run, optimizer="adamw", steps=5, checkpoint_every=5)
    train(part)
    train(replace(part, steps=8, resume=True))
    logged = {r["step"]: r["lr"] for r in _records(part.run_dir) if "lr" in r}
    for step in (6, 7, 8):
        expected = part.lr * lr_multiplier(step - 1, part.warmup_steps, 8, part.min_lr_ratio)
        assert logged[step] == pytest.approx(expected, rel=1e-12)


def test_a_corrupted_checkpoint_is_not_resumed_the_previous_one_is(small_run, tmp_path):
    """400 bytes flipped inside a tensor of the newest checkpoint (step 6) used to resume silently with weights
    off by 7e5. Now the checksum fails, the run resumes from the previous checkpoint (step 3) with a warning, and
    ends exactly as a run that was never damaged."""
    whole = _constant_lr(small_run, steps=9, run_dir=str(tmp_path / "whole"))
    train(whole)
    damaged = replace(whole, steps=6, run_dir=str(tmp_path / "damaged"))
    train(damaged)
    _flip_bytes_inside_a_tensor(Path(damaged.run_dir) / "checkpoint.pt")
    with pytest.warns(UserWarning, match="fails its checksum: .*resuming from the previous checkpoint"):
        train(replace(damaged, steps=9, resume=True))
    assert_same_checkpoint(Path(whole.run_dir) / "checkpoint.pt", Path(damaged.run_dir) / "checkpoint.pt")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731 (timing)
    assert strip(_records(damaged.run_dir)) == strip(_records(whole.run_dir))


def test_a_diverged_model_never_replaces_the_last_good_checkpoint(small_run, monkeypatch, capsys):
    """The weights turn NaN at step 5: the step-6 checkpoint is refused, the step-3 one stays (finite), the
    summary says where the run stopped, and ``spamopt train`` exits 1 with that one line."""
    real_step = lm_train._optimizer_step

    def poisoned(run, windows, step, monitor, running_loss):
        result = real_step(run, windows, step, monitor, running_loss)
        if step == 4:
            with torch.no_grad():
                run.model.layers[0].mlp.up.weight[0, 0] = float("nan")
        return result

    monkeypatch.setattr(lm_train, "_optimizer_step", poisoned)
    config = replace(small_run, optimizer="adamw")
    summary = train(config)
    assert summary["diverged"] and summary["stopped_at_step"] == 6
    assert summary["stopped"].startswith("step 6: parameter 'embed.weight' is not finite")  # NaN spread by then
    saved = torch.load(Path(config.run_dir) / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3 and all(torch.isfinite(v).all() for v in saved["model"].values())

    from spamopt.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "--model", "tiny", "--data", config.data, "--vocab-size", "512", "--cache-dir",
              config.cache_dir, "--seq-len", "32", "--batch-size", "8", "--steps", "8", "--optimizer", "adamw",
              "--eval-tokens", "1024", "--checkpoint-every", "3", "--run-dir", config.run_dir + "-cli",
              "--no-progress"])
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("spamopt: error: step 6: parameter")


def test_telemetry_is_not_duplicated_after_a_kill_before_the_first_checkpoint(small_run, tmp_path, monkeypatch):
    """Killed while writing its first checkpoint, then rerun with --resume: the run starts over at step 0 and its
    spikes.jsonl equals an uninterrupted run's (it used to append a second copy, counted twice by the report)."""
    config = replace(small_run, spikes=True, steps=6, checkpoint_every=4)
    whole = replace(config, run_dir=str(tmp_path / "whole"))
    train(whole)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    with pytest.raises(RunRefused):
        train(config)
    train(replace(config, resume=True))
    def keys(c: TrainConfig) -> list[tuple]:
        lines = (Path(c.run_dir) / "spikes" / "spikes.jsonl").read_text().splitlines()
        return [(r["kind"], r.get("name"), r.get("step")) for r in map(json.loads, lines)]

    assert keys(config) == keys(whole)


def test_compare_refuses_to_report_old_runs_under_new_settings(small_run, tmp_path):
    """Re-run with another lr or other optimizer options, ``compare`` used to resume the finished runs for 0
    steps and list their old perplexities under the new settings. Now it refuses before running anything,
    naming every run and field; --overwrite runs them again under the new settings."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "compare"
    base = replace(small_run, steps=3, checkpoint_every=0, eval_every=0)
    grid = CompareConfig(optimizers="spam,adamw", seeds="0", out_dir=str(out), optimizer_args={})
    compare(grid, base)
    before = (out / "results.json").read_text()
    with pytest.raises(RunRefused, match=r"2 runs cannot .*spam/seed0 .*\(lr: 0.003 -> 0.01\).*adamw/seed0"):
        compare(grid, replace(base, lr=1e-2))
    with pytest.raises(RunRefused, match=r"1 run cannot .*spam/seed0 .*optimizer_args: \{\} -> \{\"threshold\""):
        compare(replace(grid, optimizer_args={"spam": {"threshold": 10.0}}), base)
    assert (out / "results.json").read_text() == before
    compare(grid, replace(base, lr=1e-2, overwrite=True))
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lr"] == 1e-2 and results["optimizers"]["spam"]["val_perplexity"] != json.loads(
        before)["optimizers"]["spam"]["val_perplexity"]
