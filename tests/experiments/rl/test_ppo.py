"""``spamopt rl`` end to end on Hopper for a few thousand steps: the optimizer really is SPAM inside PPO's
policy and resets at the expected optimizer steps, evaluation is deterministic and leaves training untouched,
an interrupted run resumes where its checkpoint stands, and the comparison writes its report and PNG and
reuses finished runs."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("stable_baselines3")
pytest.importorskip("mujoco")

from spamopt import SPAM  # noqa: E402
from spamopt.experiments.harness.metrics import read_records  # noqa: E402
from spamopt.experiments.rl import train as rl_train  # noqa: E402
from spamopt.experiments.rl.compare import RLCompareConfig, compare  # noqa: E402
from spamopt.experiments.rl.train import RLConfig, build_ppo, evaluate, train  # noqa: E402


def _short(tmp_path, **overrides) -> RLConfig:
    """Two evaluation chunks of two Hopper rollouts (512 steps each, 80 optimizer steps per rollout)."""
    return RLConfig(**{"env": "Hopper-v5", "timesteps": 2048, "eval_interval": 1024, "eval_episodes": 2,
                       "run_dir": str(tmp_path / "run"), **overrides})


def test_spam_is_the_policy_optimizer_and_resets_on_schedule(tmp_path):
    """With ΔT = 160 (two rollouts) SPAM inside PPO resets at optimizer steps 160 and 320, the last minibatch of
    the 2nd and 4th update, and its clock counts every minibatch step."""
    model, _, built = build_ppo(_short(tmp_path, optimizer_args={"reset_interval": 160, "warmup_steps": 48}))
    optimizer = model.policy.optimizer
    assert isinstance(optimizer, SPAM) and built["steps_per_update"] == 80
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in model.policy.parameters()}
    optimizer.record_statistics = True
    resets, step = [], optimizer.step

    def counting_step(*args, **kwargs):
        result = step(*args, **kwargs)
        resets.append(bool(optimizer.last_statistics["reset"]))
        return result

    optimizer.step = counting_step
    model.learn(2048)
    assert len(resets) == 320
    assert [i + 1 for i, reset in enumerate(resets) if reset] == [160, 320]
    assert all(int(state["global_step"]) == 320 for state in optimizer.state.values())
    assert all(state["exp_avg"].abs().sum() > 0 for state in optimizer.state.values())


def test_evaluation_is_deterministic_and_separate(tmp_path):
    """The same policy scores the same twice; evaluating updates neither the training environment's
    normalisation statistics nor the policy, and uses its own environment."""
    model, eval_env, _ = build_ppo(_short(tmp_path, optimizer="adam"))
    model.learn(512)
    train_env = model.get_env()
    before = (train_env.obs_rms.mean.copy(), train_env.obs_rms.count, model.num_timesteps)
    weights = [p.detach().clone() for p in model.policy.parameters()]
    first = evaluate(model, eval_env, 2, seed=7)
    second = evaluate(model, eval_env, 2, seed=7)
    assert first == second and len(first) == 2
    assert eval_env is not train_env and not eval_env.training
    assert (train_env.obs_rms.mean == before[0]).all() and train_env.obs_rms.count == before[1]
    assert model.num_timesteps == before[2]
    assert all(torch.equal(a, b) for a, b in zip(weights, model.policy.parameters()))


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A run killed during its second chunk resumes from the first chunk's checkpoint: the records are those of
    an uninterrupted run's steps, and SPAM's clock continues (320 optimizer steps in all, not 160 + 320)."""
    config = _short(tmp_path, resume=True)
    real, calls = rl_train.evaluate, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # initial, after chunk 1 (checkpointed), after chunk 2: killed here
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rl_train, "evaluate", failing)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["timesteps"] == 1024
    monkeypatch.setattr(rl_train, "evaluate", real)
    summary = train(config)
    assert [r["step"] for r in read_records(config.run_dir)] == [0, 1024, 2048]
    assert summary["optimizer_steps"] == 320 and summary["timesteps"] == 2048
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert all(int(state["global_step"]) == 320 for state in saved["optimizer"]["state"].values())


def test_compare_writes_report_and_reuses_runs(tmp_path):
    """adam and spam on one task and two seeds: report.md, results.json and the task's PNG; a second call
    trains nothing."""
    base = _short(tmp_path, timesteps=1024, eval_interval=512)
    config = RLCompareConfig(envs="Hopper-v5", optimizers="adam,spam", seeds="0,1", out_dir=str(tmp_path / "cmp"))
    report = compare(config, base)
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    rows = results["envs"]["Hopper-v5"]["rows"]
    assert set(rows) == {"adam", "spam"} and len(rows["spam"]["final"]) == 2
    assert rows["spam"]["options"] == {"reset_interval": 480, "warmup_steps": 144}
    assert rows["adam"]["optimizer_steps"] == 160
    assert (tmp_path / "cmp" / "Hopper-v5.png").stat().st_size > 10_000
    text = report.read_text()
    assert "| Hopper-v5 | spam |" in text and "![Hopper-v5](Hopper-v5.png)" in text
    stamp = (tmp_path / "cmp" / "Hopper-v5" / "spam" / "seed0" / "summary.json").stat().st_mtime_ns
    compare(config, base)
    assert (tmp_path / "cmp" / "Hopper-v5" / "spam" / "seed0" / "summary.json").stat().st_mtime_ns == stamp


def test_optimizer_with_its_own_clipper_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Invalid optimizer value: 'adam-clip'.*max_grad_norm"):
        build_ppo(_short(tmp_path, optimizer="adam-clip"))


def test_mujoco_warnings_become_python_warnings_not_a_log_file(tmp_path, monkeypatch):
    """MuJoCo appends its warnings (HalfCheetah's model uses a deprecated attribute) to MUJOCO_LOG.TXT in the
    working directory; building the PPO run routes them to Python's warnings and leaves no file there."""
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="MuJoCo: .*deprecated"):
        build_ppo(_short(tmp_path, env="HalfCheetah-v5"))
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
