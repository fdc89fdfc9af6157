"""SPAM's schedule in PPO's units, the optimizer options a run gets, config validation and the message when the
``rl`` extra is missing: pure functions, no simulator needed."""

from __future__ import annotations

import pytest

from spamopt.experiments.rl.settings import optimizer_steps_per_update, ppo_settings, spam_schedule
from spamopt.experiments.rl.train import RLConfig, build_ppo, schedule_options


@pytest.mark.parametrize("env, per_update, interval, warmup", [
    ("Hopper-v5", 80, 480, 144),         # 512/32 minibatches × 5 epochs; 6 updates
    ("HalfCheetah-v5", 160, 480, 144),   # 512/64 × 20; 3 updates
    ("Ant-v5", 320, 640, 192),           # 2048/64 × 10; 500/320 rounds to 2 updates
])
def test_rollout_schedule_is_whole_updates_near_500_steps(env, per_update, interval, warmup):
    """ΔT is the whole number of PPO updates closest to SPAM's 500 optimizer steps and N = 0.3·ΔT, the paper's
    150/500; the paper schedule is SPAM's own 500/150."""
    steps = optimizer_steps_per_update(ppo_settings(env))
    assert steps == per_update
    assert spam_schedule("rollout", steps) == {"reset_interval": interval, "warmup_steps": warmup}
    assert spam_schedule("paper", steps) == {"reset_interval": 500, "warmup_steps": 150}


def test_long_updates_reset_every_update():
    """An update longer than 1000 optimizer steps still resets once per update, never every zero updates."""
    assert spam_schedule("rollout", 1600) == {"reset_interval": 1600, "warmup_steps": 480}


def test_options_per_optimizer_and_user_options_win():
    """adam gets PPO's own eps 1e-5; SPAM gets ΔT and N, Stable-SPAM only ΔT (it has no warmup); the user's
    optimizer_args override both; an optimizer without momentum reset gets no schedule."""
    assert schedule_options(RLConfig(optimizer="adam"), 80) == {"eps": 1e-5}
    assert schedule_options(RLConfig(optimizer="spam"), 80) == {"reset_interval": 480, "warmup_steps": 144}
    assert schedule_options(RLConfig(optimizer="stable-spam"), 80) == {"reset_interval": 480}
    assert schedule_options(RLConfig(optimizer="spam", spam_schedule="paper",
                                     optimizer_args={"warmup_steps": 10, "threshold": 100.0}), 80) == {
        "reset_interval": 500, "warmup_steps": 10, "threshold": 100.0}
    assert schedule_options(RLConfig(optimizer="adamw"), 80) == {}


@pytest.mark.parametrize("field, value, accepted", [
    ("spam_schedule", "daily", "rollout or paper"), ("timesteps", 0, ">= 1"), ("eval_interval", 0, ">= 1"),
    ("eval_episodes", 0, ">= 1")])
def test_bad_config_names_the_field(field, value, accepted):
    with pytest.raises(ValueError, match=rf"Invalid {field} value: .*{accepted}"):
        RLConfig(**{field: value})


def test_missing_extra_names_it(monkeypatch):
    """Without stable-baselines3 a run fails at once with the pip command that installs the extra."""
    import importlib

    real = importlib.import_module

    def without_sb3(name, *args, **kwargs):
        if name.startswith("stable_baselines3"):
            raise ImportError("No module named 'stable_baselines3'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_sb3)
    with pytest.raises(ImportError, match=r"pip install 'spamopt\[rl\]'"):
        build_ppo(RLConfig())
