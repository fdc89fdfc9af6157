"""The LM training loop: argument checks, gradient accumulation, bit-exact resume after a real SIGKILL (through
the shared kill-and-resume helper), spike telemetry, TensorBoard and W&B logs, GaLore's projector in checkpoints."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from spamopt.experiments.lm.train import TrainConfig, train

from ..harness.resume import assert_same_checkpoint, kill_and_resume
from .helpers import checkpoint_weights as _weights, train_command


def _records(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


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
    order. After 8 AdamW steps the typical weight differs by summation noise (median ≤ 1e-7) and no weight by
    more than 1e-4. Adam divides by sqrt(v), so a coordinate whose gradient is near zero can amplify that noise
    to ~1e-5 (measured: at most 1.01e-5, in 11 of 164,672 weights); a wrong micro-batch split or scale moves
    most weights by about lr = 3e-3 per step."""
    full = replace(small_run, optimizer="adamw")
    train(full)
    accumulated = replace(full, micro_batch_size=4, run_dir=full.run_dir + "-accumulated")
    train(accumulated)
    expected, got = _weights(full.run_dir), _weights(accumulated.run_dir)
    differences = torch.cat([(got[name] - value).abs().flatten() for name, value in expected.items()])
    assert differences.median() <= 1e-7 and differences.max() <= 1e-4, (differences.median(), differences.max())


@pytest.mark.parametrize("optimizer", ["spam", "spam-sparse", "zclip", "stable-spam", "adamw+adagn"])
def test_resume_after_sigkill_is_bit_exact(small_run, optimizer):
    """A training process killed with SIGKILL mid-run (possibly while writing a checkpoint) resumes from its
    last whole checkpoint and ends with exactly the weights, optimizer state and logged losses of a run that
    was never interrupted. SPAM resets every 5 steps and its sparse masks are redrawn, so the resumed part
    crosses a reset; ZClip's running statistics are part of the checkpoint, and so are Stable-SPAM's (MoRet
    every 5 steps) and AdaClipGN's statistics inside the wrapped AdamW's state."""
    if optimizer == "zclip":
        pytest.importorskip("zclip")
    options = {"spam": {"reset_interval": 5, "warmup_steps": 2, "clip_delay": 1, "threshold": 2.0},
               "stable-spam": {"reset_interval": 5}}
    options["spam-sparse"] = options["spam"]
    base = replace(small_run, optimizer=optimizer, steps=48, checkpoint_every=4, eval_every=12,
                   optimizer_args=options.get(optimizer, {}))
    whole = replace(base, run_dir=base.run_dir + "-whole")
    train(whole)

    metrics = Path(base.run_dir) / "metrics.jsonl"
    killed_at: list[int] = []

    def past_step_9() -> bool:
        return metrics.exists() and any(r.get("step", 0) >= 9 for r in _records(base.run_dir) if r)

    def resume() -> None:
        killed_at.append(json.loads(metrics.read_text().splitlines()[-1])["step"])
        assert not (Path(base.run_dir) / "summary.json").exists()
        train(replace(base, resume=True))

    kill_and_resume(train_command(base), reached=past_step_9, resume=resume)
    assert killed_at[0] < base.steps
    assert_same_checkpoint(Path(whole.run_dir) / "checkpoint.pt", Path(base.run_dir) / "checkpoint.pt")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731 (timing)
    assert strip(_records(base.run_dir)) == strip(_records(whole.run_dir))


def _spike_records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "spikes" / "spikes.jsonl").read_text().splitlines()]


def test_spike_telemetry_is_written_with_spam_statistics(small_run):
    """--spikes writes the monitor's records with SPAM's clip counts, numbered like metrics.jsonl: the loss the
    monitor saw at step s is the train_loss logged for step s (log_every=1), and SPAM's reset at τ = 5 is
    recorded at step 5."""
    run = replace(small_run, spikes=True, optimizer="spam",
                  optimizer_args={"clip_delay": 0, "threshold": 1.0, "reset_interval": 5, "warmup_steps": 2})
    train(run)
    records = _spike_records(run.run_dir)
    kinds = {r["kind"] for r in records}
    assert {"meta", "loss", "tensor", "optimizer"} <= kinds
    assert sum(sum(r["clipped"].values()) for r in records if r["kind"] == "optimizer") > 0
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "loss"}
    logged = {r["step"]: r["train_loss"] for r in _records(run.run_dir) if "train_loss" in r}
    assert sorted(losses) == sorted(logged) == list(range(1, run.steps + 1))
    assert all(losses[s] == pytest.approx(logged[s], rel=1e-6) for s in logged)
    assert [r["step"] for r in records if r["kind"] == "optimizer" and r["reset"]] == [5]


def test_nullify_spikes_zeroes_them_before_the_optimizer_sees_them(small_run):
    """--nullify-spikes: until the first step with a coordinate above GSS 50 the run is the observing run step
    for step; after it the losses part (the zeroed coordinates reached the optimizer). At this size the spikes are
    embedding rows of rare tokens, so the parting shows once those tokens are back in a batch."""
    observe = replace(small_run, spikes=True, optimizer="adamw", steps=64, eval_every=0, checkpoint_every=0,
                      run_dir=small_run.run_dir + "-observe")
    nullify = replace(observe, spikes=False, nullify_spikes=True, run_dir=small_run.run_dir + "-nullify")
    train(observe)
    train(nullify)
    counts: dict[int, float] = {}
    for record in _spike_records(nullify.run_dir):
        if record["kind"] == "tensor":
            counts[record["step"]] = counts.get(record["step"], 0) + record["spikes"]
    first = min(step for step, count in counts.items() if count > 0)
    losses = [{r["step"]: r["train_loss"] for r in _records(run.run_dir) if "train_loss" in r}
              for run in (observe, nullify)]
    assert all(losses[0][s] == losses[1][s] for s in range(1, first + 1))
    assert any(losses[0][s] != losses[1][s] for s in range(first + 1, nullify.steps + 1))


def test_spike_telemetry_resumes_after_sigkill_like_an_uninterrupted_run(small_run):
    """Killed mid-run and resumed from its last checkpoint, a --spikes run ends with the same spikes.jsonl as a
    run never interrupted: records written after the checkpoint are dropped, not repeated, and the running
    statistics (GSS sums, z-score moments) come from the checkpoint instead of restarting at zero."""
    base = replace(small_run, spikes=True, optimizer="spam", steps=40, checkpoint_every=4, eval_every=20,
                   optimizer_args={"reset_interval": 5, "warmup_steps": 2, "clip_delay": 1, "threshold": 2.0})
    whole = replace(base, run_dir=base.run_dir + "-whole")
    train(whole)
    metrics = Path(base.run_dir) / "metrics.jsonl"

    def past_step_9() -> bool:
        return metrics.exists() and any(r.get("step", 0) >= 9 for r in _records(base.run_dir) if r)

    kill_and_resume(train_command(base), reached=past_step_9, resume=lambda: train(replace(base, resume=True)))
    assert _spike_records(base.run_dir) == _spike_records(whole.run_dir)
    assert_same_checkpoint(Path(whole.run_dir) / "checkpoint.pt", Path(base.run_dir) / "checkpoint.pt",
                           keys=("model", "optimizer", "spike_monitor"))


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


@pytest.mark.parametrize("quant", ["int4", "fp4"])
def test_a_quantised_model_trains_and_resumes_bit_exactly(small_run, quant, monkeypatch):
    """--quant fake-quantises the block linears: the run records its scheme, its loss falls, and a run that
    dies right after its step-4 checkpoint resumes to exactly the uninterrupted run's master weights (the
    checkpoint holds full-precision weights; the quantised copies are recomputed)."""
    import spamopt.experiments.lm.train as train_module

    base = replace(small_run, quant=quant, optimizer="spam", steps=8, checkpoint_every=4, log_every=1,
                   optimizer_args={"reset_interval": 3, "warmup_steps": 1, "clip_delay": 1})
    whole = replace(base, run_dir=base.run_dir + "-whole")
    train(whole)
    losses = [r["train_loss"] for r in _records(whole.run_dir) if "train_loss" in r]
    assert losses[-1] < losses[0]
    assert json.loads((Path(whole.run_dir) / "config.json").read_text())["quant"] == quant
    save = train_module.checkpoint.save

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(base)
    monkeypatch.setattr(train_module.checkpoint, "save", save)
    train(replace(base, resume=True))
    assert_same_checkpoint(Path(whole.run_dir) / "checkpoint.pt", Path(base.run_dir) / "checkpoint.pt")


def test_z_loss_term_is_the_mean_squared_log_normaliser():
    """Against a float64 transcription of PaLM's z-loss: mean over positions of (log Σ_j exp(logit_j))²."""
    from spamopt.experiments.lm.train import z_loss_term

    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0)) * 5
    expected = sum(math.log(sum(math.exp(x) for x in row)) ** 2 for row in logits.double().tolist()) / 6
    assert z_loss_term(logits).item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_and_qk_norm_take_effect_and_losses_stay_the_cross_entropy(small_run):
    """z_loss changes the update (the weights after a step differ) but not what is reported: the first step's
    loss, from the same initial weights and batch, is the same cross-entropy with and without it. qk_norm
    puts its weights in the checkpoint. Both are off by default, and z_loss must be >= 0."""
    with pytest.raises(ValueError, match="Invalid z_loss value: -1.0 .*>= 0"):
        TrainConfig(z_loss=-1.0)
    base = replace(small_run, optimizer="adamw", steps=2, eval_every=0, checkpoint_every=0)
    plain, with_z = base, replace(base, z_loss=0.1, run_dir=base.run_dir + "-z")
    normed = replace(base, qk_norm=True, run_dir=base.run_dir + "-qk")
    for config in (plain, with_z, normed):
        train(config)
    first = [_records(c.run_dir)[0] for c in (plain, with_z)]
    assert first[0]["step"] == first[1]["step"] == 1 and first[0]["train_loss"] == first[1]["train_loss"]
    weights = [_weights(c.run_dir) for c in (plain, with_z, normed)]
    assert not torch.equal(weights[0]["head.weight"], weights[1]["head.weight"])
    assert "layers.0.attn.q_norm.weight" in weights[2] and "layers.0.attn.q_norm.weight" not in weights[0]


def test_compiled_blocks_train_like_eager_and_checkpoints_are_interchangeable(small_run):
    """--compile on: each block goes through torch.compile, the losses match eager's to float rounding, the
    checkpoint has exactly the eager run's keys and shapes, and a compiled run resumes eager (--compile is free
    on resume). auto leaves a model under 5M parameters eager; a bad value names the accepted ones."""
    from spamopt.optim.compiled import compiled_available

    with pytest.raises(ValueError, match="Invalid compile value: 'maybe' .*'on', 'off' or 'auto'"):
        TrainConfig(compile="maybe")
    if not compiled_available("cpu"):
        pytest.skip("torch.compile needs a C++ compiler")
    eager = replace(small_run, optimizer="adamw", steps=4, eval_every=0, checkpoint_every=2)
    compiled = replace(eager, compile="on", run_dir=eager.run_dir + "-compiled")
    assert train(eager)["compiled"] is False  # auto, 164K parameters
    assert train(compiled)["compiled"] is True
    losses = [[r["train_loss"] for r in _records(c.run_dir) if "train_loss" in r] for c in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    weights = [_weights(c.run_dir) for c in (eager, compiled)]
    assert {k: v.shape for k, v in weights[0].items()} == {k: v.shape for k, v in weights[1].items()}
    assert train(replace(compiled, steps=6, compile="off", resume=True))["compiled"] is False
    assert [r["step"] for r in _records(compiled.run_dir) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]


def test_forensics_record_updates_and_signals_and_leave_training_unchanged(small_run):
    """--forensics (implies --spikes): update records for every tensor and step, and per step the output
    log-sum-exp and one largest attention logit per layer; the trained weights are bit-identical to a run
    without telemetry (forensics only read)."""
    base = replace(small_run, optimizer="spam", steps=3, eval_every=0, checkpoint_every=0)
    watched = replace(base, forensics=True, run_dir=base.run_dir + "-forensics")
    train(base)
    train(watched)
    records = [json.loads(line) for line in (Path(watched.run_dir) / "spikes" / "spikes.jsonl").open()]
    updates = [r for r in records if r["kind"] == "update"]
    tensors = len(_weights(base.run_dir))
    assert len(updates) == 3 * tensors and all(r["update_rms"] >= 0 for r in updates)
    signals = [r["values"] for r in records if r["kind"] == "signals"]
    assert len(signals) == 3 and set(signals[0]) == {"output_log_z", "max_attention_logit.layers.0",
                                                     "max_attention_logit.layers.1"}
    plain, forensic = _weights(base.run_dir), _weights(watched.run_dir)
    assert all(torch.equal(plain[name], forensic[name]) for name in plain)


def test_pure_bf16_trains_in_bf16_with_bf16_moments(small_run):
    """--pure-bf16: the checkpoint's parameters and SPAM's moments are bf16 (the reference script's setting),
    its clock stays an integer, and the loss stays finite; Stable-SPAM keeps its statistics in float64."""
    for optimizer in ("spam", "stable-spam"):
        config = replace(small_run, optimizer=optimizer, pure_bf16=True, steps=3, eval_every=0, checkpoint_every=0,
                         run_dir=f"{small_run.run_dir}-{optimizer}")
        assert math.isfinite(train(config)["val_loss"])
        saved = torch.load(Path(config.run_dir) / "checkpoint.pt", weights_only=True)
        assert all(value.dtype == torch.bfloat16 for value in saved["model"].values())
        state = saved["optimizer"]["state"]["head.weight"]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert state["global_step"].dtype == torch.int64
        if optimizer == "stable-spam":
            assert state["norm_ema"].dtype == torch.float64
