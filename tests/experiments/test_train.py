"""The training loop: the LR schedule, argument checks, gradient accumulation, bit-exact resume after a real
SIGKILL, every installed optimizer by name, spike telemetry, and the comparison report."""

from __future__ import annotations

import builtins
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from spamopt.experiments.lm.compare import CompareConfig, compare
from spamopt.experiments.lm.config import CONFIGS
from spamopt.experiments.lm.model import Llama
from spamopt.experiments.lm.optimizers import OPTIMIZERS, build_optimizer, state_bytes
from spamopt.experiments.lm.train import TrainConfig, lr_multiplier, train

from .conftest import checkpoint_weights as _weights, train_command


def _records(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_is_linear_warmup_then_cosine_to_the_floor():
    values = [lr_multiplier(s, 10, 110, 0.1) for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0) and values[10] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_perplexity_of_a_diverged_run_is_infinite_not_an_error():
    from spamopt.experiments.lm.train import perplexity

    assert perplexity(math.log(30.0)) == pytest.approx(30.0)
    assert perplexity(800.0) == math.inf and math.isnan(perplexity(math.nan))


@pytest.mark.parametrize("field,value,accepted", [("model", "7b", "one of"), ("steps", 0, ">= 1"),
                                                  ("min_lr_ratio", 1.5, r"in \[0, 1\]"),
                                                  ("parallel", "zero3", "'ddp' or 'fsdp'")])
def test_bad_config_values_name_the_field_and_the_range(field, value, accepted):
    with pytest.raises(ValueError, match=rf"Invalid {field} value: .*{accepted}"):
        TrainConfig(**{field: value})


def test_micro_batch_must_divide_the_batch(small_run):
    with pytest.raises(ValueError, match="Invalid micro_batch_size value: 3"):
        train(replace(small_run, micro_batch_size=3))


def test_gradient_accumulation_matches_the_full_batch(small_run):
    """Two micro-batches of 4 (loss / 2 each) give the same update as one batch of 8, up to float summation
    order: the final weights agree to 1e-5 after 8 AdamW steps."""
    full = replace(small_run, optimizer="adamw")
    train(full)
    accumulated = replace(full, micro_batch_size=4, run_dir=full.run_dir + "-accumulated")
    train(accumulated)
    for name, value in _weights(full.run_dir).items():
        torch.testing.assert_close(_weights(accumulated.run_dir)[name], value, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("optimizer", ["spam", "spam-sparse", "zclip"])
def test_resume_after_sigkill_is_bit_exact(small_run, optimizer):
    """A training process killed with SIGKILL mid-run (possibly while writing a checkpoint) resumes from its
    last whole checkpoint and ends with exactly the weights, optimizer state and logged losses of a run that
    was never interrupted. SPAM resets every 5 steps and its sparse masks are redrawn, so the resumed part
    crosses a reset; ZClip's running statistics are part of the checkpoint."""
    if optimizer == "zclip":
        pytest.importorskip("zclip")
    base = replace(small_run, optimizer=optimizer, steps=48, checkpoint_every=4, eval_every=12,
                   optimizer_args={} if optimizer == "zclip" else {"reset_interval": 5, "warmup_steps": 2,
                                                                    "clip_delay": 1, "threshold": 2.0})
    whole = replace(base, run_dir=base.run_dir + "-whole")
    train(whole)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(train_command(base), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = Path(base.run_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and any(r.get("step", 0) >= 9 for r in _records(base.run_dir) if r):
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert killed_at < base.steps
    assert not (Path(base.run_dir) / "summary.json").exists()

    train(replace(base, resume=True))
    for name, value in _weights(whole.run_dir).items():
        assert torch.equal(_weights(base.run_dir)[name], value), name
    saved_whole = torch.load(Path(whole.run_dir) / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    saved_resumed = torch.load(Path(base.run_dir) / "checkpoint.pt", weights_only=True)["optimizer"]["state"]
    for name, state in saved_whole.items():
        for key, value in state.items():
            assert torch.equal(saved_resumed[name][key], value), (name, key)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731 (timing)
    assert strip(_records(base.run_dir)) == strip(_records(whole.run_dir))


def test_every_installed_optimizer_builds_and_steps():
    """Each name builds on the tiny LLaMA and changes the weights in one step; a missing package is reported
    with the extra that installs it."""
    built = []
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        model = Llama(CONFIGS["tiny"])
        try:
            setup = build_optimizer(name, model, lr=1e-2)
        except ImportError as error:
            assert "pip install 'spamopt[" in str(error)
            continue
        before = [p.detach().clone() for p in model.parameters()]
        tokens = torch.randint(0, 256, (2, 17))
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        if setup.clipper is not None:
            setup.clipper(model)
        setup.optimizer.step()
        moved = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert moved >= len(before) // 2, name
        assert state_bytes(setup.optimizer) > 0, name
        built.append(name)
    assert {"adamw", "adam-clip", "spam", "spam-sparse"} <= set(built)


def test_spam_sparse_keeps_a_quarter_of_the_block_matrices_moments():
    model = Llama(CONFIGS["mini"])
    dense, sparse = (build_optimizer(n, model, lr=1e-3).optimizer for n in ("spam", "spam-sparse"))
    for opt in (dense, sparse):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    matrices = sum(p.numel() for n, p in model.named_parameters() if ".attn." in n or ".mlp." in n)
    saved = state_bytes(dense) - state_bytes(sparse)
    assert saved == pytest.approx(matrices * 8 * 0.75 - matrices / 8, rel=0.01)


def test_a_missing_baseline_names_its_extra(monkeypatch):
    real_import = builtins.__import__

    def no_lion(name, *args, **kwargs):
        if name.startswith("lion_pytorch"):
            raise ImportError("No module named 'lion_pytorch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lion)
    monkeypatch.delitem(sys.modules, "lion_pytorch", raising=False)
    with pytest.raises(ImportError, match=r"spamopt\[baselines\].*lion-pytorch"):
        build_optimizer("lion", Llama(CONFIGS["tiny"]), lr=1e-3)
    with pytest.raises(ValueError, match="Invalid optimizer value: 'sgd'"):
        build_optimizer("sgd", Llama(CONFIGS["tiny"]), lr=1e-3)


def test_spike_telemetry_is_written_with_spam_statistics(small_run):
    run = replace(small_run, spikes=True, optimizer="spam", optimizer_args={"clip_delay": 0, "threshold": 1.0})
    train(run)
    records = [json.loads(line) for line in (Path(run.run_dir) / "spikes" / "spikes.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"meta", "loss", "tensor", "optimizer"} <= kinds
    assert sum(sum(r["clipped"].values()) for r in records if r["kind"] == "optimizer") > 0


def test_compare_writes_a_report_with_mean_and_std_over_seeds(small_run, tmp_path):
    """Two optimizers × two seeds: the report's mean ± std is computed from the runs' own summaries, the PNG
    exists, and a second call reuses the finished runs instead of training again."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "compare"
    base = replace(small_run, steps=4, checkpoint_every=0, eval_every=0)
    report = compare(CompareConfig(optimizers="spam,adamw", seeds="0,1", out_dir=str(out)), base)
    results = json.loads((out / "results.json").read_text())
    for name in ("spam", "adamw"):
        ppl = [json.loads((out / name / f"seed{s}" / "summary.json").read_text())["val_perplexity"] for s in (0, 1)]
        row = results["optimizers"][name]
        assert row["val_perplexity_mean"] == pytest.approx(sum(ppl) / 2)
        assert row["val_perplexity_std"] == pytest.approx(abs(ppl[0] - ppl[1]) / math.sqrt(2))
        assert f"{row['val_perplexity_mean']:.2f} ± {row['val_perplexity_std']:.2f}" in report.read_text()
    assert (out / "curves.png").stat().st_size > 10_000
    stamp = (out / "spam" / "seed0" / "summary.json").stat().st_mtime_ns
    compare(CompareConfig(optimizers="spam,adamw", seeds="0,1", out_dir=str(out)), base)
    assert (out / "spam" / "seed0" / "summary.json").stat().st_mtime_ns == stamp


def test_the_main_command_on_a_minimal_budget(token_cache, tmp_path, capsys):
    """``spamopt compare`` with its defaults (SPAM, AdamW, Adam + clipping; two seeds; the embedded stdlib
    corpus) on a budget of 3 steps: every run finishes with a finite perplexity and the report is written."""
    from spamopt.cli import main

    out = tmp_path / "compare"
    main(["compare", "--model", "tiny", "--steps", "3", "--vocab-size", "300", "--seq-len", "32", "--batch-size",
          "4", "--eval-tokens", "512", "--out-dir", str(out), "--cache-dir", str(token_cache), "--no-progress"])
    assert capsys.readouterr().out.strip().endswith("report.md")
    results = json.loads((out / "results.json").read_text())
    assert set(results["optimizers"]) == {"spam", "adamw", "adam-clip"} and results["seeds"] == [0, 1]
    assert results["config"]["data"] == "stdlib"
    assert all(math.isfinite(v) for row in results["optimizers"].values() for v in row["val_perplexity"])
    assert (out / "curves.png").exists() and "| spam |" in (out / "report.md").read_text()


def test_tensorboard_scalars_are_written(small_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = replace(small_run, tensorboard=True, steps=4)
    train(run)
    events = EventAccumulator(str(Path(run.run_dir) / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_loss", "lr", "tokens_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3, 4]


def test_wandb_is_offline_unless_asked(small_run, monkeypatch):
    """W&B gets every metrics record; without WANDB_MODE it runs offline, so no run ever needs a network.
    (A stand-in module records the calls: the real package is an optional extra.)"""
    import types

    calls: dict = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(replace(small_run, wandb=True, steps=4))
    assert calls["init"]["mode"] == "offline" and calls["init"]["config"]["steps"] == 4
    assert [step for step, values in calls["log"] if "train_loss" in values] == [1, 2, 3, 4]
    assert calls["finished"]


def test_galore_resumes_bit_exactly_with_its_projectors(small_run, monkeypatch):
    """GaLore keeps a projector object in its state, which torch.distributed.checkpoint cannot hold: the
    checkpoint stores it beside the state dict and rebuilds it, and a crashed run resumes bit-exactly across
    projector updates (every 3 steps here)."""
    pytest.importorskip("galore_torch")
    import spamopt.experiments.lm.train as train_module

    base = replace(small_run, optimizer="galore", optimizer_args={"update_proj_gap": 3}, steps=8, checkpoint_every=4)
    whole = replace(base, run_dir=base.run_dir + "-whole")
    train(whole)
    save = train_module.checkpoint.save

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies right after its first checkpoint (step 4)

    monkeypatch.setattr(train_module.checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(base)
    monkeypatch.setattr(train_module.checkpoint, "save", save)
    train(replace(base, resume=True))
    for name, value in _weights(whole.run_dir).items():
        assert torch.equal(_weights(base.run_dir)[name], value), name
