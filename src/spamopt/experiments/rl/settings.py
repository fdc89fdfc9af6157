"""PPO's hyper-parameters per task, and SPAM's schedule in PPO's units.

The settings are RL Baselines3 Zoo's (``hyperparams/ppo.yml``): its tuned entries for ``Hopper-v3`` and
``HalfCheetah-v3``, and its MuJoCo defaults for ``Ant-v3`` (stable-baselines3's PPO defaults with observation
and reward normalisation), applied here to gymnasium's v5 tasks. Any other task gets the Ant entry.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ZOO_PPO", "ppo_settings", "optimizer_steps_per_update", "spam_schedule", "PAPER_SCHEDULE"]

_TUNED_POLICY = {"log_std_init": -2, "ortho_init": False, "activation_fn": torch.nn.ReLU,
                 "net_arch": {"pi": [256, 256], "vf": [256, 256]}}

ZOO_PPO: dict[str, dict[str, Any]] = {
    "Hopper": {"n_steps": 512, "batch_size": 32, "n_epochs": 5, "gamma": 0.999, "gae_lambda": 0.99,
               "learning_rate": 9.80828e-05, "ent_coef": 0.00229519, "clip_range": 0.2, "max_grad_norm": 0.7,
               "vf_coef": 0.835671, "policy_kwargs": _TUNED_POLICY},
    "HalfCheetah": {"n_steps": 512, "batch_size": 64, "n_epochs": 20, "gamma": 0.98, "gae_lambda": 0.92,
                    "learning_rate": 2.0633e-05, "ent_coef": 0.000401762, "clip_range": 0.1, "max_grad_norm": 0.8,
                    "vf_coef": 0.58096, "policy_kwargs": _TUNED_POLICY},
    # The zoo's MuJoCo defaults: PPO's own (n_steps 2048, batch 64, 10 epochs, lr 3e-4, 64-64 tanh networks).
    "Ant": {"n_steps": 2048, "batch_size": 64, "n_epochs": 10, "gamma": 0.99, "gae_lambda": 0.95,
            "learning_rate": 3e-4, "ent_coef": 0.0, "clip_range": 0.2, "max_grad_norm": 0.5, "vf_coef": 0.5,
            "policy_kwargs": {}},
}

#: SPAM's own defaults (ΔT, N), counted in optimizer steps as in the paper's LLM runs.
PAPER_SCHEDULE = {"reset_interval": 500, "warmup_steps": 150}


def ppo_settings(env_id: str) -> dict[str, Any]:
    """The zoo's PPO keyword arguments for ``env_id`` (``Hopper-v5`` → the ``Hopper`` entry)."""
    family = env_id.split("-")[0]
    settings = ZOO_PPO.get(family, ZOO_PPO["Ant"])
    return {**settings, "policy_kwargs": dict(settings["policy_kwargs"])}


def optimizer_steps_per_update(settings: dict[str, Any], n_envs: int = 1) -> int:
    """Optimizer steps PPO takes per rollout: ``n_epochs × ⌈n_steps·n_envs / batch_size⌉`` (no KL early stop)."""
    minibatches = -(-settings["n_steps"] * n_envs // settings["batch_size"])
    return settings["n_epochs"] * minibatches


def spam_schedule(kind: str, steps_per_update: int) -> dict[str, int]:
    """SPAM's ΔT and N for PPO.

    ``"paper"``: 500 and 150 optimizer steps, SPAM's defaults. ``"rollout"``: ΔT is the whole number of PPO
    updates closest to those 500 steps (at least one), so every reset lands on the last minibatch of an update
    and the warmup covers the start of the next one, which trains on fresh on-policy data; N keeps the paper's
    ratio N/ΔT = 0.3.
    """
    if kind == "paper":
        return dict(PAPER_SCHEDULE)
    if kind != "rollout":
        raise ValueError(f"Invalid spam_schedule value: {kind!r} (rollout or paper)")
    updates = max(1, round(PAPER_SCHEDULE["reset_interval"] / steps_per_update))
    interval = updates * steps_per_update
    return {"reset_interval": interval, "warmup_steps": round(0.3 * interval)}
