"""One PPO run, read top to bottom: stable-baselines3's PPO with the zoo's settings on a gymnasium MuJoCo task,
its optimizer replaced by the one named, trained in chunks of ``eval_interval`` environment steps; after each
chunk the deterministic policy is evaluated on a separate environment (the papers' "test reward") and the run
is checkpointed atomically.

Resuming continues from the last evaluation with the saved policy, optimizer state (SPAM's clock included),
observation-normalisation statistics and step counts. The episode in progress and MuJoCo's simulator state are
not saved: a resumed run starts fresh episodes from a generator reseeded with (seed, step), so it is
reproducible but not bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import multiprocessing
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from spamopt.extras import require

from ..harness import checkpoint
from ..harness.config import check_fields, option
from ..harness.metrics import Metrics
from ..harness.rundir import begin, overwrite_option, plan, resume_option, write_summary
from ..harness.optimizers import ModelLayout, build_optimizer
from .settings import optimizer_steps_per_update, ppo_settings, spam_schedule

__all__ = ["RLConfig", "train", "evaluate", "build_ppo", "schedule_options"]

# Optimizers with SPAM's momentum reset, and the schedule keys each takes.
_SCHEDULED = {"spam": ("reset_interval", "warmup_steps"), "spam-sparse": ("reset_interval", "warmup_steps"),
              "stable-spam": ("reset_interval",)}
# PPO's own optimizer is torch.optim.Adam with eps=1e-5 (stable-baselines3's ActorCriticPolicy default).
_DEFAULT_OPTIONS = {"adam": {"eps": 1e-5}}


@dataclass
class RLConfig:
    """Everything a run depends on; saved as ``config.json`` in the run directory."""

    env: str = option("Hopper-v5", "a gymnasium task id (Hopper-v5, Ant-v5, HalfCheetah-v5, ...)")
    optimizer: str = option("spam", "a registry name: adam (PPO's own: eps 1e-5), spam, stable-spam, ...")
    optimizer_args: dict[str, Any] = option(dict, "JSON object passed to the optimizer's constructor (wins over "
                                                  "--spam-schedule)")
    spam_schedule: str = option("rollout", "SPAM's ΔT and N: rollout (whole PPO updates, about 500 optimizer "
                                           "steps, N = 0.3·ΔT) or paper (500 and 150)")
    timesteps: int = option(1_000_000, "environment steps of training (rounded up to whole evaluation chunks)")
    eval_interval: int = option(10_000, "environment steps between evaluations (rounded up to whole rollouts)")
    eval_episodes: int = option(5, "episodes per evaluation of the deterministic policy")
    seed: int = option(0, "seed of the policy, the environments and the minibatch order")
    run_dir: str = option("runs/rl/run", "where config, metrics, checkpoint and summary go")
    resume: bool = resume_option()
    overwrite: bool = overwrite_option()

    FREE_ON_RESUME: ClassVar[frozenset[str]] = frozenset({"timesteps"})  # what --resume may change: the length

    def __post_init__(self) -> None:
        check_fields(self, {
            "spam_schedule": (self.spam_schedule in ("rollout", "paper"), "rollout or paper"),
            "timesteps": (self.timesteps >= 1, ">= 1"),
            "eval_interval": (self.eval_interval >= 1, ">= 1"),
            "eval_episodes": (self.eval_episodes >= 1, ">= 1"),
        })


def schedule_options(config: RLConfig, steps_per_update: int) -> dict[str, Any]:
    """The optimizer's constructor options: its defaults here, SPAM's schedule in PPO's units, then the user's
    ``optimizer_args`` on top."""
    base = config.optimizer.removesuffix("+adagn")
    keys = _SCHEDULED.get(base, ())
    schedule = spam_schedule(config.spam_schedule, steps_per_update)
    return {**_DEFAULT_OPTIONS.get(base, {}), **{key: schedule[key] for key in keys}, **config.optimizer_args}


def _policy_layout(hidden: int) -> ModelLayout:
    """The hidden-layer matrices of the actor and critic networks are the block matrices (sparse momentum,
    GaLore); input layers, heads, biases and the log-std stay dense."""
    def is_block_matrix(name: str, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and name.startswith("mlp_extractor.") and shape[0] == shape[1]

    return ModelLayout(is_block_matrix=is_block_matrix, hidden=hidden, heads=1)


def build_ppo(config: RLConfig) -> tuple[Any, Any, dict[str, Any]]:
    """(PPO with the named optimizer, the evaluation environment, the optimizer's options)."""
    sb3 = require("stable_baselines3", "rl", "stable-baselines3")
    mujoco = require("mujoco", "rl", "gymnasium[mujoco]")
    # MuJoCo's own handler appends every warning to MUJOCO_LOG.TXT in the user's working directory.
    mujoco.set_mju_user_warning(lambda message: warnings.warn(f"MuJoCo: {message}", stacklevel=2))
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    settings = ppo_settings(config.env)
    # The zoo's "normalize: true": observations and rewards, the return discounted with PPO's gamma.
    train_env = VecNormalize(make_vec_env(config.env, n_envs=1, seed=config.seed), gamma=settings["gamma"])
    eval_env = VecNormalize(make_vec_env(config.env, n_envs=1, seed=config.seed + 10_000), training=False,
                            norm_reward=False)
    model = sb3.PPO("MlpPolicy", train_env, seed=config.seed, device="cpu", verbose=0, **settings)
    steps_per_update = optimizer_steps_per_update(settings)
    options = schedule_options(config, steps_per_update)
    hidden = (settings["policy_kwargs"].get("net_arch") or {"pi": [64]})["pi"][0]
    setup = build_optimizer(config.optimizer, model.policy, _policy_layout(hidden), lr=model.lr_schedule(1.0),
                            options=dict(options))
    if setup.clipper is not None:
        raise ValueError(f"Invalid optimizer value: {config.optimizer!r} (PPO clips the gradient norm itself, "
                         "with max_grad_norm: choose an optimizer without its own clipper)")
    model.policy.optimizer = setup.optimizer  # PPO steps and schedules whatever optimizer its policy holds
    return model, eval_env, {"options": options, "steps_per_update": steps_per_update, "ppo": settings}


def evaluate(model: Any, eval_env: Any, episodes: int, seed: int) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes of the deterministic policy on ``eval_env``, which takes
    the training environment's observation statistics but never updates them; reseeded each time, so the same
    policy always scores the same."""
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import sync_envs_normalization

    sync_envs_normalization(model.get_env(), eval_env)
    eval_env.seed(seed)
    returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=episodes, deterministic=True,
                                 return_episode_rewards=True)
    return [float(r) for r in returns]


def _normalizer_state(env: Any) -> dict[str, Any]:
    def running(rms: Any) -> dict[str, Any]:
        return {"mean": torch.tensor(rms.mean), "var": torch.tensor(rms.var), "count": float(rms.count)}

    return {"obs": running(env.obs_rms), "ret": running(env.ret_rms)}


def _load_normalizer(env: Any, state: dict[str, Any]) -> None:
    for rms, saved in ((env.obs_rms, state["obs"]), (env.ret_rms, state["ret"])):
        rms.mean, rms.var, rms.count = saved["mean"].numpy().copy(), saved["var"].numpy().copy(), saved["count"]
        if rms.mean.ndim == 0:  # the return statistics are scalars
            rms.mean, rms.var = rms.mean.item(), rms.var.item()


def _chunk(config: RLConfig, rollout: int) -> int:
    return -(-config.eval_interval // rollout) * rollout


def _progress_bar(total: int, initial: int) -> Any:
    """A bar over environment steps in the main process; worker processes report through the runner instead."""
    if multiprocessing.current_process().name != "MainProcess":
        return None
    tqdm = require("tqdm", "rl").tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)


def train(config: RLConfig) -> dict[str, Any]:
    """Train in evaluation-sized chunks, evaluate and checkpoint after each; returns and writes
    ``summary.json``."""
    start = plan(config)
    model, eval_env, built = build_ppo(config)
    begin(start, config)
    run_dir = start.run_dir
    policy, optimizer, train_env = model.policy, model.policy.optimizer, model.get_env()
    chunk = _chunk(config, model.n_steps)
    total = -(-config.timesteps // chunk) * chunk
    eval_seed = config.seed + 20_000

    path = run_dir / checkpoint.CHECKPOINT
    # PPO counts an "update" per epoch over the rollout; each epoch is a fixed number of minibatch steps.
    minibatches = built["steps_per_update"] // model.n_epochs
    progress: dict[str, Any] = {"timesteps": 0, "updates": 0, "seconds": 0.0, "best": None, "last": None}
    if start.resume:
        saved = checkpoint.load(path, model=policy, optimizer=optimizer, distributed=False)
        progress = saved["progress"]
        _load_normalizer(train_env, saved["normalizer"])
        model.num_timesteps, model._n_updates = progress["timesteps"], progress["updates"]
        model.set_random_seed(config.seed + progress["timesteps"])  # fresh episodes, reproducibly
    metrics = Metrics(run_dir, config=asdict(config), resumed_step=progress["timesteps"])

    def record(seconds: float) -> None:
        returns = evaluate(model, eval_env, config.eval_episodes, eval_seed)
        reward = sum(returns) / len(returns)
        episodes = [info["r"] for info in model.ep_info_buffer or []]
        values = {"test_reward": reward, "test_reward_std": float(torch.tensor(returns).std(unbiased=False))}
        if episodes:  # the training episodes finished in the last 100 (sb3's window), rewards as the task gives them
            values["train_reward"] = sum(episodes) / len(episodes)
        metrics.log(progress["timesteps"], **values, optimizer_steps=progress["updates"] * minibatches,
                    seconds=seconds)
        progress["last"] = {"timesteps": progress["timesteps"], "test_reward": reward}
        if progress["best"] is None or reward > progress["best"]["test_reward"]:
            progress["best"] = dict(progress["last"])

    if progress["last"] is None:
        record(0.0)  # the initial policy
    bar = _progress_bar(total, progress["timesteps"])
    stopped = None
    while progress["timesteps"] < total:
        began = time.perf_counter()
        model.learn(chunk, reset_num_timesteps=False)
        progress["seconds"] += time.perf_counter() - began
        progress["timesteps"], progress["updates"] = model.num_timesteps, model._n_updates
        record(progress["seconds"])
        try:
            checkpoint.save(path, model=policy, optimizer=optimizer, rank=0, distributed=False,
                            step=progress["timesteps"], progress=progress, normalizer=_normalizer_state(train_env))
        except checkpoint.NonFiniteError as error:  # diverged: the last good checkpoint stays, the run ends here
            stopped = error
            break
        if bar is not None:
            bar.update(chunk)
            bar.set_postfix(test_reward=f"{progress['last']['test_reward']:.0f}")
    if bar is not None:
        bar.close()
    metrics.close()
    summary = {"env": config.env, "optimizer": config.optimizer, "seed": config.seed,
               "timesteps": progress["timesteps"], "last": progress["last"], "best": progress["best"],
               "train_seconds": progress["seconds"], "optimizer_steps": progress["updates"] * minibatches,
               "steps_per_update": built["steps_per_update"], "optimizer_options": built["options"],
               "ppo": {k: v for k, v in built["ppo"].items() if k != "policy_kwargs"},
               "parameters": sum(p.numel() for p in policy.parameters())}
    if stopped is not None:
        summary.update(diverged=True, stopped_at_timestep=stopped.step, stopped=str(stopped))
    write_summary(run_dir, summary)
    return summary
