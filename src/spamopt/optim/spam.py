"""``spamopt.SPAM``: the optimizer class. Validation, parameter groups, lazy state and the step clock;
the arithmetic lives in :mod:`spamopt.optim.functional`."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import schedule, sparse
from .functional import spam

__all__ = ["SPAM"]

# Counters the step clock reads on the host: they stay on the CPU (like torch.optim.Adam's default `step`).
_HOST_STATE = frozenset({"global_step", "mask_seed"})
_INTEGER_STATE = {"global_step": torch.int64, "mask_seed": torch.int64}


def _check_number(name: str, value: Any, low: float, *, low_open: bool = False, high: float = math.inf,
                  high_open: bool = True, accepted: str) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"Invalid {name} value: {value!r} ({accepted})")


def _check_integer(name: str, value: Any, accepted: str) -> None:
    if not (isinstance(value, Integral) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"Invalid {name} value: {value!r} ({accepted})")


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r} (must be True or False)")


def _validate_group(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr_value = lr.item()
    else:
        lr_value = lr
    if not (isinstance(lr_value, Real) and not isinstance(lr_value, bool) and lr_value >= 0):
        raise ValueError(f"Invalid learning rate: {lr_value!r} (must be >= 0)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas value: {betas!r} (must be a pair (beta1, beta2))")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            raise ValueError("betas must be floats; tensor betas are not supported")
        if not (isinstance(beta, Real) and not isinstance(beta, bool) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {index}: {beta!r} (must be in [0, 1))")
    _check_number("epsilon", group["eps"], 0.0, accepted="must be a finite number >= 0")
    _check_number("weight_decay", group["weight_decay"], 0.0, accepted="must be a finite number >= 0")
    _check_number("threshold", group["threshold"], 0.0,
                  accepted="must be a finite number >= 0; 0 disables spike clipping")
    _check_integer("reset_interval", group["reset_interval"],
                   "must be an integer >= 0; 0 disables momentum resets and mask redraws")
    _check_integer("warmup_steps", group["warmup_steps"],
                   "must be an integer >= 0; 0 disables the post-reset warmup")
    _check_integer("clip_delay", group["clip_delay"], "must be an integer >= 0")
    _check_number("density", group["density"], 0.0, low_open=True, high=1.0, high_open=False,
                  accepted="must be in (0, 1]")
    for flag in ("bias_correction_reset", "maximize", "skip_nonfinite"):
        _check_flag(flag, group[flag])
    _check_flag("capturable", group["capturable"])
    if group["capturable"] and (group["fused"] is False or group["foreach"]):
        raise ValueError("Invalid capturable value: True (needs the fused implementation: fused=True or None)")
    if group["capturable"] and group["density"] < 1.0:
        raise ValueError(f"Invalid density value: {group['density']} with capturable=True (sparse masks are "
                         "redrawn from the host's random generator, which a CUDA graph cannot replay; use 1.0)")
    for flag in ("foreach", "fused"):
        if group[flag] is not None:
            _check_flag(flag, group[flag])
    if group["foreach"] and group["fused"]:
        raise ValueError("Invalid foreach/fused values: True/True (choose one implementation)")


class SPAM(Optimizer):
    r"""Spike-Aware Adam with Momentum reset (Huang et al., ICLR 2025, arXiv 2501.06842).

    Adam with three additions, each switchable per parameter group:

    * **spike-aware clipping** — before the moment update, every gradient coordinate with ``g² > θ·v``
      (``v`` the raw second moment before this step) becomes ``sign(g)·sqrt(θ·v)``; off for the first
      ``clip_delay`` steps of training and of every reset period;
    * **momentum reset** — ``m`` and ``v`` are zeroed at the start of steps ``τ = ΔT, 2ΔT, …`` (``τ`` the
      1-based step index) and the update is multiplied by ``s(c) = 1 − 0.99·(1 + cos(π c/(N+1)))/2`` for
      the ``N`` steps after each reset (``c`` = steps since the reset; ``s = 1`` before the first reset);
    * **sparse momentum** — in a group with ``density < 1`` each 2-D parameter keeps moments for a random
      ``density`` fraction of its coordinates; only those move, and the subset is redrawn every period.

    The update, with ``k`` the number of steps the parameter had a gradient (bias correction keeps counting
    across resets unless ``bias_correction_reset=True``)::

        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
        p ← p − lr · s · sqrt(1 − β2^k)/(1 − β1^k) · m/(sqrt(v) + ε)
        p ← p − lr · weight_decay · p

    Note that ``ε`` is added to ``sqrt(v)``, not to the bias-corrected ``sqrt(v̂)`` as in ``torch.optim.Adam``
    (identical when ``eps=0``), and that weight decay is decoupled and applied after the update.

    Args:
        params: parameters or parameter groups; every keyword below can be overridden per group.
        lr: learning rate (float or 1-element tensor, for schedulers and ``torch.compile``).
        betas: coefficients of the moment averages, each in ``[0, 1)``.
        eps: term added to ``sqrt(v)``; the reference uses 1e-6.
        weight_decay: decoupled weight decay.
        threshold: spike threshold θ; 0 disables clipping.
        reset_interval: ΔT, steps between momentum resets; 0 disables resets and mask redraws.
        warmup_steps: N, length of the post-reset cosine warmup; 0 disables it.
        clip_delay: D, steps without clipping at the start and after each reset.
        density: fraction of each matrix's coordinates that keep moments, in ``(0, 1]``.
        bias_correction_reset: restart Adam's bias correction at each reset (the reference does not).
        maximize: maximise the objective (the gradient's sign is flipped on a private copy).
        foreach: use the multi-tensor implementation.
        fused: use the fused Triton kernel (one pass over ``p, g, m, v`` for many tensors per launch; real
            float32/bfloat16/float16 parameters; CUDA, or the CPU under ``TRITON_INTERPRET=1``). ``None`` (for
            both flags) picks fused when every parameter of the group qualifies and Triton is installed, else
            foreach on CUDA, else the for-loop reference.
        capturable: keep the step clock on the device and take every decision (reset, clipping in force,
            warmup multiplier, skip) there, so ``step()`` can be captured in a CUDA graph and replayed. Needs
            the fused implementation, ``density=1`` and the same value in every group; give ``lr`` as a
            tensor on the device for a schedule to reach the graph.
        skip_nonfinite: when any gradient of the step holds NaN or Inf, skip the whole step (no parameter,
            moment or bias-correction count changes; ``state['skipped_steps']`` counts them), decided on the
            device without a host synchronisation. ``False`` treats non-finite coordinates as zero instead.

    Mixed precision: under ``torch.amp.GradScaler`` every implementation takes the scaler's loss scale and inf
    flag directly (``_step_supports_amp_scaling``, as torch's fused optimizers do): the gradients are unscaled
    inside the step (``p.grad`` stays scaled, untouched), and a step the scaler flags is skipped on the device
    in every group, without the host reading the flag.

    State per parameter (all tensors, so ``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint``
    round-trip it): ``step`` (bias-correction count ``k``), ``global_step`` (steps this optimizer completed,
    on the CPU: the reset clock), ``skipped_steps``, ``exp_avg``, ``exp_avg_sq``; sparse parameters also hold
    ``mask_bits`` (one bit per coordinate) and ``mask_seed``, and their moments are compact 1-D buffers.

    The step clock starts with the first step in which any parameter has a gradient. Sparse masks are drawn
    from ``torch.initial_seed()`` and the parameter's position, so seed every data-parallel rank alike.
    """

    # Telemetry, not state: class-level defaults, so instances made by deepcopy or unpickling (which restore
    # only defaults, state and param_groups) have them too.
    #: Set to True (``spamopt.spikes.SpikeMonitor`` does) to fill :attr:`last_statistics` every step.
    record_statistics: bool = False
    #: After a step with ``record_statistics``: ``clipped`` (param → 0-dim count of coordinates clipped, on
    #: the device), ``reset`` (moments were reset), ``warmup_multiplier`` (smallest over groups), ``skipped``
    #: (0-dim bool: the step was skipped for non-finite gradients, or None).
    last_statistics: dict[str, Any] | None = None
    # torch.amp.GradScaler hands this optimizer its loss scale and inf flag (as the attributes ``grad_scale``
    # and ``found_inf``) instead of unscaling the gradients and reading the flag on the host.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        threshold: float = 5000.0,
        reset_interval: int = 500,
        warmup_steps: int = 150,
        clip_delay: int = 20,
        density: float = 1.0,
        bias_correction_reset: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        skip_nonfinite: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, threshold=threshold,
            reset_interval=reset_interval, warmup_steps=warmup_steps, clip_delay=clip_delay, density=density,
            bias_correction_reset=bias_correction_reset, maximize=maximize, foreach=foreach,
            fused=fused, capturable=capturable, skip_nonfinite=skip_nonfinite,
        )
        _validate_group(defaults)
        super().__init__(params, defaults)
        # torch.optim.Optimizer.__setstate__ adds this key; set it here so copies and pickles compare equal.
        self.defaults.setdefault("differentiable", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _validate_group(group)
        if self.param_groups and group["capturable"] != self.param_groups[0]["capturable"]:
            raise ValueError("Invalid capturable value: every parameter group must use the same (one clock)")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in _SPAM_DEFAULT_FLAGS.items():
            for group in self.param_groups:
                group.setdefault(key, value)

    # ----------------------------------------------------------------------------------------- state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer`` but keep each state tensor's own dtype.

        The base class casts every floating state tensor except ``step`` to its parameter's dtype (and ints to
        floats for floating parameters), which would corrupt the integer clock, the seeds and the bitmasks.
        """
        saved = state_dict["state"]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(saved_ids, params):
            if pid not in saved:
                continue
            restored = self.state[param]
            on_host = _HOST_STATE - ({"global_step"} if self.param_groups[0]["capturable"] else set())
            for key, value in saved[pid].items():
                device = torch.device("cpu") if key in on_host else param.device
                if isinstance(value, Tensor):
                    restored[key] = value.to(device=device)
                elif key in _INTEGER_STATE or key in ("step", "skipped_steps"):
                    dtype = _INTEGER_STATE.get(key, torch.float32)
                    restored[key] = torch.tensor(value, dtype=dtype, device=device)

    def _completed_steps(self) -> int | Tensor:
        """Steps taken so far: an int, or with ``capturable`` the device clock itself (reading it would sync)."""
        for state in self.state.values():
            if "global_step" in state:
                clock = state["global_step"]
                return clock.clone() if self.param_groups[0]["capturable"] else int(clock)
        return 0

    def _init_state(self, param: Tensor, group: dict[str, Any], completed: int, ordinal: int) -> None:
        state = self.state[param]
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        if group["capturable"]:
            state["global_step"] = torch.as_tensor(completed, dtype=torch.int64).to(param.device, copy=True)
        else:
            state["global_step"] = torch.tensor(completed, dtype=torch.int64)
        state["skipped_steps"] = torch.zeros((), dtype=torch.float32, device=param.device)
        if group["density"] < 1.0 and param.dim() == 2:
            numel, dtype = _real_numel(param), param.real.dtype
            seed = sparse.param_seed(torch.initial_seed(), ordinal)
            generation = schedule.mask_generation(completed + 1, group["reset_interval"])
            state["mask_seed"] = torch.tensor(seed, dtype=torch.int64)
            state["mask_bits"] = sparse.draw_mask(numel, group["density"], seed, generation, param.device)
            kept = sparse.kept_count(numel, group["density"])
            state["exp_avg"] = torch.zeros(kept, dtype=_moment_dtype(dtype), device=param.device)
            state["exp_avg_sq"] = torch.zeros(kept, dtype=_moment_dtype(dtype), device=param.device)
        else:
            moment = _moment_dtype(param.dtype)
            state["exp_avg"] = torch.zeros_like(param, dtype=moment, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=moment, memory_format=torch.preserve_format)

    def _redraw_masks(self, group: dict[str, Any], generation: int) -> None:
        for param in group["params"]:
            state = self.state.get(param)
            if not state or "mask_bits" not in state:
                continue
            seed = int(state["mask_seed"])
            bits = sparse.draw_mask(_real_numel(param), group["density"], seed, generation, param.device)
            state["mask_bits"] = bits
            state["exp_avg"].zero_()  # the new subset starts from zero moments
            state["exp_avg_sq"].zero_()

    # ------------------------------------------------------------------------------------------ step

    @staticmethod
    def _all_finite(grads: list[Tensor]) -> Tensor | None:
        """One 0-dim boolean: are all gradients finite? Computed on the device, no host synchronisation."""
        if not grads:
            return None
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in map(_local, grads):
            # Empty tensors (and empty FSDP shards) hold nothing non-finite; inf-norms of them are undefined.
            if g.numel():
                by_device.setdefault(g.device, []).append(torch.view_as_real(g) if g.is_complex() else g)
        if not by_device:
            by_device[grads[0].device] = [torch.zeros(1, device=grads[0].device)]
        flags = [
            torch.stack(torch._foreach_norm(gs, float("inf"))).isfinite().all() for gs in by_device.values()
        ]
        home = flags[0].device
        return torch.stack([f.to(home, non_blocking=True) for f in flags]).all()

    def _keep(self, batches: list, found_inf: Tensor | None) -> Tensor | None:
        """This step's 0-dim ``keep`` flag (False: skip it), or None when no group skips.

        Under ``torch.amp.GradScaler`` the scaler has already checked every gradient (``found_inf``) and every
        group skips a step it flags, as torch's optimizers do; otherwise groups with ``skip_nonfinite`` are
        checked here.
        """
        if found_inf is not None:
            keep = found_inf.reshape(()) == 0
        else:
            keep = self._all_finite([g for group, _, grads, _ in batches if group["skip_nonfinite"] for g in grads])
        if keep is not None and any(_is_distributed_tensor(g) for _, _, grads, _ in batches for g in grads):
            # Each rank sees only its shard: agree on the decision, or ranks would drift apart.
            agreed = keep.to(torch.int32)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            keep = agreed.bool()
        return keep

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        completed = self._completed_steps()
        current = completed + 1  # τ, the 1-based index of this step
        ordinal = 0
        batches = []
        for group in self.param_groups:
            params, grads, masks = [], [], []
            for param in group["params"]:
                ordinal += 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("SPAM does not support sparse gradients")
                if not self.state[param]:
                    if group["density"] < 1.0 and param.dim() == 2 and _is_distributed_tensor(param):
                        raise NotImplementedError("SPAM's sparse momentum (density < 1) does not support "
                                                  "sharded DTensor parameters (FSDP2); use density=1.0")
                    self._init_state(param, group, completed, ordinal - 1)
                params.append(param)
                grads.append(param.grad)
                masks.append(self.state[param].get("mask_bits"))
            batches.append((group, params, grads, masks))

        # Set by torch.amp.GradScaler.step for the duration of this call (see _step_supports_amp_scaling).
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        keep = self._keep(batches, found_inf)

        statistics: dict[str, Any] = {"clipped": {}, "reset": False, "warmup_multiplier": 1.0, "skipped": None}
        for group, params, grads, masks in batches:
            if not params:
                continue
            beta1, beta2 = group["betas"]
            interval = group["reset_interval"]
            if group["capturable"]:
                clock = torch.as_tensor(current, dtype=torch.int64, device=params[0].device)
                reset, threshold, multiplier = schedule.device_decisions(
                    clock, group["threshold"], interval, group["warmup_steps"], group["clip_delay"])
            else:
                reset = schedule.is_reset_step(current, interval)
                multiplier = schedule.warmup_multiplier(current, interval, group["warmup_steps"])
                clipping = schedule.clipping_active(current, group["threshold"], interval, group["clip_delay"])
                threshold = group["threshold"] if clipping else 0.0
            foreach, fused = group["foreach"], group["fused"]
            if fused is None:  # the default: fused where it runs compiled
                fused = foreach is None and all(p.is_cuda and _fusable(p) for p in params)
            elif fused and not all(_fusable(p) for p in params):
                raise RuntimeError("fused=True needs Triton and real float32/bfloat16/float16 parameters on CUDA "
                                   "(or on the CPU with TRITON_INTERPRET=1)")
            if foreach is None:
                foreach = not fused and all(p.is_cuda for p in params)
            states = [self.state[p] for p in params]
            clip_counts: list[Tensor | None] | None = [None] * len(params) if self.record_statistics else None
            spam(
                [_local(p) for p in params],
                [_local(g) for g in grads],
                [_local(s["exp_avg"]) for s in states],
                [_local(s["exp_avg_sq"]) for s in states],
                [s["step"] for s in states],
                masks,
                keep=keep if group["skip_nonfinite"] or found_inf is not None else None,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                threshold=threshold,
                reset=reset,
                warmup_multiplier=multiplier,
                bias_correction_reset=group["bias_correction_reset"],
                maximize=group["maximize"],
                foreach=foreach,
                fused=fused,
                density=group["density"],
                clip_counts=clip_counts,
                grad_scale=grad_scale,
            )
            if clip_counts is not None:
                statistics["clipped"].update((p, c) for p, c in zip(params, clip_counts) if c is not None)
                if group["capturable"]:  # device values: comparing them here would synchronise
                    statistics["reset"], statistics["warmup_multiplier"] = reset.bool(), multiplier
                else:
                    statistics["reset"] = statistics["reset"] or reset
                    statistics["warmup_multiplier"] = min(statistics["warmup_multiplier"], multiplier)

        if self.record_statistics:
            statistics["skipped"] = None if keep is None else ~keep
            self.last_statistics = statistics
        self._advance_clock(keep)
        for group in self.param_groups:
            if not group["capturable"] and schedule.is_mask_redraw_step(current, group["reset_interval"]):
                self._redraw_masks(group, schedule.mask_generation(current + 1, group["reset_interval"]))
        return loss

    def _advance_clock(self, keep: Tensor | None) -> None:
        """Every parameter with state advances the clock, with or without a gradient this step."""
        states = [s for s in self.state.values() if "global_step" in s]
        if not states:
            return
        torch._foreach_add_([s["global_step"] for s in states], 1)
        if keep is not None:
            skipped = (~keep).float()
            for s in states:
                s["skipped_steps"].add_(skipped.to(s["skipped_steps"].device, non_blocking=True))


def _moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """Moments of half-precision parameters are kept in float32: v underflows in bf16/fp16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fusable(param: Tensor) -> bool:
    """The fused kernel can step this parameter (or, for a DTensor, its local shard: the step is elementwise)."""
    from .fused import fused_available

    return param.dtype in (torch.float32, torch.bfloat16, torch.float16) and fused_available(_local(param).device)


def _is_distributed_tensor(tensor: Tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2): SPAM's dense step is elementwise, so each rank updates its shard."""
    return tensor.to_local() if _is_distributed_tensor(tensor) else tensor


def _real_numel(param: Tensor) -> int:
    return param.numel() * (2 if param.is_complex() else 1)


# Keyword-only arguments added after the first release; older pickles get them from the signature.
_SPAM_DEFAULT_FLAGS = {
    name: arg.default for name, arg in inspect.signature(SPAM.__init__).parameters.items()
    if arg.kind is inspect.Parameter.KEYWORD_ONLY
}
