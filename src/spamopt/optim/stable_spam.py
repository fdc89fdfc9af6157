"""``spamopt.StableSPAM``: Stable-SPAM (Huang et al., arXiv 2502.17055) on the machinery SPAM uses
(:class:`spamopt.optim.base.SpikeAwareOptimizer`); the arithmetic is :mod:`spamopt.optim.stable_functional`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import schedule
from .base import (GroupBatch, SpikeAwareOptimizer, check_flag, check_integer, local, moment_dtype, scalar_dtype,
                   scalar_lr, validate_common)
from .stabilize import new_statistics, shard_group, validate_stabilizer
from .stable_functional import COMPAT_NOT_COMPILED, StableStep, momentum_multiplier, stable_spam

__all__ = ["StableSPAM", "PRESETS"]

#: The paper's two settings (its released scripts): BF16 pre-training and 4-bit training.
PRESETS: dict[str, dict[str, Any]] = {
    "bf16": {"gamma1": 0.85, "gamma2": 0.99999, "gamma3": 0.999, "reset_interval": 1000},
    "4bit": {"gamma1": 0.7, "gamma2": 0.9, "gamma3": 0.999, "reset_interval": 1000},
}


def _validate_group(group: dict[str, Any]) -> None:
    validate_common(group)
    validate_stabilizer(group["gamma1"], group["gamma2"], group["gamma3"], group["eps"], group["adaclip"])
    check_integer("reset_interval", group["reset_interval"], "must be an integer >= 0; 0 disables momentum resets")
    total = group["total_steps"]
    if total is not None:
        check_integer("total_steps", total, "must be None or an integer >= 1")
        if total < 1:
            raise ValueError(f"Invalid total_steps value: {total!r} (must be None or an integer >= 1)")
    eta = group["eta_min"]
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0.0 <= eta <= 1.0):
        raise ValueError(f"Invalid eta_min value: {eta!r} (must be in [0, 1])")
    check_flag("reference_compat", group["reference_compat"])
    check_flag("adagn", group["adagn"])
    check_flag("fp32_moments", group["fp32_moments"])
    if group["fused"]:
        raise ValueError("Invalid fused value: True (StableSPAM has no fused kernel; use compiled, foreach or the "
                         "for-loop)")
    if group["compiled"] and group["reference_compat"]:
        raise ValueError(COMPAT_NOT_COMPILED)
    if group["capturable"]:
        raise ValueError("Invalid capturable value: True (StableSPAM does not support CUDA-graph capture)")


class StableSPAM(SpikeAwareOptimizer):
    r"""Stable-SPAM: AdaClip → AdaGN → MoRet → Adam, every statistic per parameter tensor.

    For each parameter with a gradient ``g`` (a private copy; ``p.grad`` is never modified), at 1-based step
    ``τ`` with momentum multiplier ``σ`` (1, or the cosine schedule when ``total_steps`` is set)::

        p ← p·(1 − lr·wd)
        n ← n + 1
        AdaClip: μ = max|g|; M ← γ3·M + (1 − γ3)·μ; M̂ = M/(1 − γ3^n); where |g| > M̂: g ← g·M̂/μ
        AdaGN:   r = ‖g‖; a ← γ1σ·a + (1 − γ1σ)·r; b ← γ2·b + (1 − γ2)·r²;
                 if r > 0: g ← g/r · (a/(1 − (γ1σ)^n)) / (sqrt(b/(1 − γ2^n)) + ε)
        MoRet:   if ΔT > 0 and τ mod ΔT = 0: m, v, k ← 0
        Adam:    k ← k + 1; β1' = β1σ; m ← β1'm + (1 − β1')g; v ← β2v + (1 − β2)g²
                 p ← p − lr/(1 − β1'^k) · m/(sqrt(v)/sqrt(1 − β2^k) + ε)

    ``σ_τ = η + (1 − η)·(1 + cos(π·min(τ, T)/(T + 1)))/2`` with ``T = total_steps``, ``η = eta_min``.

    Args:
        params: parameters or parameter groups; every keyword can be overridden per group.
        lr: Adam's learning rate.
        betas: Adam's (β1, β2).
        eps: Adam's ε, added torch-style; also AdaGN's ε.
        weight_decay: decoupled weight decay, applied first.
        gamma1: AdaGN's mean-norm decay (-1: β1).
        gamma2: AdaGN's squared-norm decay.
        gamma3: AdaClip's decay.
        reset_interval: ΔT of MoRet (0: off).
        total_steps: T of the optional momentum schedule σ (None: σ = 1).
        eta_min: η, the schedule's floor.
        adaclip: ``"scale"`` (the paper: spiked coordinates scaled by M̂/μ), ``"clamp"`` (to ±M̂) or ``"off"``.
        adagn: apply AdaGN. With ``adaclip="off", adagn=False`` this is Adam + MoRet, the paper's ablation base.
        reference_compat: reproduce the authors' released optimizer: one counter for every bias correction,
            reset to 1 by MoRet, whose zero moments take effect one step late; σ not clamped past
            ``total_steps``; statistics kept in the parameter dtype. ``p.grad`` is still never modified.
        maximize: as in :class:`spamopt.SPAM`.
        foreach: as in :class:`spamopt.SPAM`. ``fused`` and ``capturable`` are not available (no kernel yet).
        skip_nonfinite: as in :class:`spamopt.SPAM`.
        fp32_moments: as in :class:`spamopt.SPAM`; the statistics stay fp32 (float64 scalars) either way.
        compiled: the whole per-tensor step (AdaClip's and AdaGN's reductions included) as one
            ``torch.compile`` function, as :class:`spamopt.SPAM`'s ``compiled``: the default on the CPU with a
            C++ compiler for groups of at least ``compile_min_numel`` (10M) elements, and for float32/float64
            groups of any size where the native loop builds (:mod:`spamopt.optim.native`, one call per
            group; with AdaGN its norm's sum of squares is taken in float64, so it agrees with the
            torch.compile kernel to rounding); not with ``reference_compat``.

    State per parameter (tensors): ``step`` (Adam count k; the one counter in compat), ``stat_step`` (n),
    ``max_ema`` (M), ``norm_ema`` (a), ``norm_sq_ema`` (b), ``exp_avg``, ``exp_avg_sq``, ``global_step`` (the
    clock, on the CPU), ``skipped_steps``. Moments and statistics are fp32 for bf16/fp16 parameters.
    """

    _validate = staticmethod(_validate_group)

    def _fusable(self, param: Tensor) -> bool:
        return False  # no fused kernel yet

    def _has_native_step(self, group: dict[str, Any]) -> bool:
        """Every group but ``reference_compat`` (whose late reset has no compiled path)."""
        return not group["reference_compat"]

    def _implementation(self, group: dict[str, Any], params: list[Tensor]) -> str:
        if group["reference_compat"] and group["compiled"] is None:
            group = {**group, "compiled": False}  # the reference's late reset has no compiled path
        return super()._implementation(group, params)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        reset_interval: int = 1000,
        total_steps: int | None = None,
        eta_min: float = 0.5,
        adaclip: str = "scale",
        adagn: bool = True,
        reference_compat: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        compiled: bool | None = None,
        capturable: bool = False,
        skip_nonfinite: bool = True,
        fp32_moments: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma1=gamma1, gamma2=gamma2, gamma3=gamma3,
            reset_interval=reset_interval, total_steps=total_steps, eta_min=eta_min, adaclip=adaclip, adagn=adagn,
            reference_compat=reference_compat, maximize=maximize, foreach=foreach, fused=fused, compiled=compiled,
            fp32_moments=fp32_moments,
            capturable=capturable, skip_nonfinite=skip_nonfinite,
        )
        super().__init__(params, defaults)

    @classmethod
    def from_preset(cls, preset: str, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                    **overrides: Any) -> StableSPAM:
        """The paper's settings by name (``"bf16"`` or ``"4bit"``, see :data:`PRESETS`), ``overrides`` on top."""
        if preset not in PRESETS:
            raise ValueError(f"Invalid preset value: {preset!r} (one of {', '.join(map(repr, PRESETS))})")
        return cls(params, **{**PRESETS[preset], **overrides})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in _DEFAULT_FLAGS.items():
            for group in self.param_groups:
                group.setdefault(key, value)

    def _init_state(self, param: Tensor, group: dict[str, Any], completed: int | Tensor, ordinal: int) -> None:
        state = self.state[param]
        real_dtype = param.real.dtype if param.is_complex() else param.dtype
        state["step"] = torch.zeros((), dtype=scalar_dtype(), device=param.device)
        state.update(self._new_clock(param, group, completed))
        statistics = new_statistics(param, real_dtype if group["reference_compat"] else None)
        if group["reference_compat"]:
            del statistics["stat_step"]  # one counter: ``step``
        state.update(statistics)
        moment = moment_dtype(param.dtype, group["fp32_moments"])
        state["exp_avg"] = torch.zeros_like(param, dtype=moment, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=moment, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = self._evaluate(closure)
        completed = self._completed_steps()
        current = completed + 1  # τ
        batches = self._gather(completed)
        grad_scale, found_inf = self._amp_scaling()
        # The non-finite check's per-tensor max|g| is AdaClip's and AdaGN's peak: the compiled kernel takes it
        # rather than reading every gradient once more for it.
        keep, peaks = self._keep_and_peaks(batches, found_inf)
        for batch in batches:
            if batch.params:
                self._step_group(batch, current, self._group_keep(batch.group, keep, found_inf), grad_scale,
                                 [peaks.get(id(g)) for g in batch.grads])
        self._advance_clock(keep)
        return loss

    def _step_group(self, batch: GroupBatch, current: int, keep: Tensor | None, grad_scale: Tensor | None,
                    peaks: list[Tensor | None]) -> None:
        group, params = batch.group, batch.params
        beta1, beta2 = group["betas"]
        sigma = momentum_multiplier(current, group["total_steps"], group["eta_min"],
                                    clamp=not group["reference_compat"])
        gamma1 = beta1 if group["gamma1"] == -1 else group["gamma1"]
        settings = StableStep(
            lr=scalar_lr(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            gamma1=gamma1 * sigma, gamma2=group["gamma2"], gamma3=group["gamma3"], sigma=sigma,
            reset=schedule.is_reset_step(current, group["reset_interval"]), adaclip=group["adaclip"],
            adagn=group["adagn"], maximize=group["maximize"], reference_compat=group["reference_compat"],
            shard_group=shard_group(params))
        states = [self.state[p] for p in params]
        stable_spam([local(p) for p in params], [local(g) for g in batch.grads], [local(s["exp_avg"]) for s in states],
                    [local(s["exp_avg_sq"]) for s in states], [s["step"] for s in states], states, settings,
                    keep=keep, implementation=self._implementation(group, params), grad_scale=grad_scale, peaks=peaks)


# Keyword-only arguments added after the first release; older pickles get them from the signature.
_DEFAULT_FLAGS = {
    name: arg.default for name, arg in inspect.signature(StableSPAM.__init__).parameters.items()
    if arg.kind is inspect.Parameter.KEYWORD_ONLY
}
