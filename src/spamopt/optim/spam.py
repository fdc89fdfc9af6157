"""``spamopt.SPAM``: the optimizer class. Defaults, SPAM's own validation and state, and one step that reads its
clock and hands each group to :func:`spamopt.optim.functional.spam`; the machinery it shares with other
optimizers (gathering, GradScaler, non-finite skips, DTensor, implementation choice, state loading) is
:class:`spamopt.optim.base.SpikeAwareOptimizer`."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import schedule, sharding, sparse
from .base import (GroupBatch, SpikeAwareOptimizer, check_flag, check_integer, check_number, local,
                   moment_dtype, real_view, scalar_dtype, scalar_lr, validate_common)
from .functional import SpamStep, spam

__all__ = ["SPAM"]


def _validate_group(group: dict[str, Any]) -> None:
    validate_common(group)
    check_number("threshold", group["threshold"], 0.0,
                 accepted="must be a finite number >= 0; 0 disables spike clipping")
    check_integer("reset_interval", group["reset_interval"],
                  "must be an integer >= 0; 0 disables momentum resets and mask redraws")
    check_integer("warmup_steps", group["warmup_steps"], "must be an integer >= 0; 0 disables the post-reset warmup")
    check_integer("clip_delay", group["clip_delay"], "must be an integer >= 0")
    check_number("density", group["density"], 0.0, low_open=True, high=1.0, high_open=False,
                 accepted="must be in (0, 1]")
    check_flag("bias_correction_reset", group["bias_correction_reset"])
    check_flag("reference_compat", group["reference_compat"])
    check_flag("fp32_moments", group["fp32_moments"])
    check_flag("keep_positions", group["keep_positions"])
    if group["capturable"] and group["density"] < 1.0:
        raise ValueError(f"Invalid density value: {group['density']} with capturable=True (sparse masks are "
                         "redrawn from the host's random generator, which a CUDA graph cannot replay; use 1.0)")


class SPAM(SpikeAwareOptimizer):
    r"""Spike-Aware Adam with Momentum reset (Huang et al., ICLR 2025, arXiv 2501.06842).

    Adam with three additions, each switchable per parameter group:

    * **spike-aware clipping** — before the moment update, every gradient coordinate with ``g² > θ·v``
      (``v`` the raw second moment before this step) becomes ``sign(g)·sqrt(θ·v)``; off for the first
      ``clip_delay`` steps of training and of every reset period. Coordinates whose ``v`` is still 0 have no
      history to judge a spike by and are not clipped (``reference_compat=True``: clipped to 0, as the
      authors' code does);
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
        clip_delay: D, steps without clipping at the start and after each reset (0: clipping from the first
            step on, which is safe because coordinates with ``v = 0`` are never clipped).
        density: fraction of each matrix's coordinates that keep moments, in ``(0, 1]``.
        bias_correction_reset: restart Adam's bias correction at each reset (the reference does not).
        maximize: maximise the objective (the gradient's sign is flipped on a private copy).
        foreach: use the multi-tensor implementation.
        fused: use the fused Triton kernel (one pass over ``p, g, m, v`` for many tensors per launch; real
            float32/bfloat16/float16 parameters; CUDA, or the CPU under ``TRITON_INTERPRET=1``). ``None`` (for
            both flags) picks fused when every parameter of the group qualifies and Triton is installed, else
            foreach on CUDA, else the for-loop reference.
        compiled: use one ``torch.compile``-generated loop per tensor (:mod:`spamopt.optim.compiled`; a C++
            compiler on the CPU, Triton on CUDA); on the CPU a group's dense float32/float64 tensors are
            stepped instead by one native loop over them all (:mod:`spamopt.optim.native`, the same bits).
            It is the default on the CPU (when every flag is ``None``) for groups of at least
            ``SPAM.compile_min_numel`` (10M) elements, where compiling (about 20 s, cached on disk
            afterwards) pays for itself, and for dense float32/float64 groups of any size where the native
            loop builds (``SPAMOPT_NATIVE=0`` switches it off); ``compiled=False`` turns it off.
        capturable: keep the step clock on the device and take every decision (reset, clipping in force,
            warmup multiplier, skip) there, so ``step()`` can be captured in a CUDA graph and replayed. Needs
            the fused implementation, ``density=1`` and the same value in every group; give ``lr`` as a
            tensor on the device for a schedule to reach the graph.
        skip_nonfinite: when any gradient of the step holds NaN or Inf, skip the whole step (no parameter,
            moment update or bias-correction count changes; ``state['skipped_steps']`` counts them), decided on
            the device without a host synchronisation. ``False`` treats non-finite coordinates as zero instead.
            A skipped step that falls on a reset step still zeroes the moments: the reset belongs to the clock,
            not to the data, and skipping it would carry the pre-reset moments through a whole period (sparse
            masks were already redrawn for it).
        reference_compat: clip coordinates whose ``v`` is 0 to 0, as the authors' released code does; such
            coordinates (a parameter or embedding row first stepped after the clip-free window, every
            parameter when ``clip_delay`` is 0 or 1) then do not move until the next reset's window.
        fp32_moments: keep the moments of bf16/fp16 parameters in float32 (the default: ``v`` underflows in
            half precision). ``False`` keeps them in the parameter's dtype, as torch's AdamW and the authors'
            pure-bf16 training do.
        keep_positions: keep each sparse matrix's kept positions between steps (int32, 4 bytes per kept
            coordinate: at density ``d`` another ``4·d`` bytes per matrix element beside the ``8·d + 0.125``
            of moments and mask) instead of finding them in the bitmask every step, a large part of a compiled
            sparse step on the CPU (about 1.4x faster with them at LLaMA-60M shapes). Not state: they are found
            again after a mask redraw or loading a checkpoint. No effect on dense groups or on the fused kernel,
            which reads the bitmask itself.

    Mixed precision: under ``torch.amp.GradScaler`` every implementation takes the scaler's loss scale and inf
    flag directly (``_step_supports_amp_scaling``, as torch's fused optimizers do): the gradients are unscaled
    inside the step (``p.grad`` stays scaled, untouched), and a step the scaler flags is skipped on the device
    in every group, without the host reading the flag.

    State per parameter (all tensors, so ``torch.load(weights_only=True)`` and ``torch.distributed.checkpoint``
    round-trip it): ``step`` (bias-correction count ``k``), ``global_step`` (steps this optimizer completed,
    on the CPU: the reset clock), ``skipped_steps``, ``exp_avg``, ``exp_avg_sq``; sparse parameters also hold
    ``mask_bits`` (one bit per coordinate) and ``mask_seed``, and their moments are compact 1-D buffers.
    Under FSDP2 a sparse matrix's rank keeps the whole mask and the moments of its own rows' kept coordinates;
    ``state_dict`` saves the moments whole (a collective then), so checkpoints reshard (see :mod:`.sharding`).

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
    #: Warps per program of the fused kernel (a launch setting, not a hyperparameter); None: the kernel's default.
    fused_num_warps: int | None = None

    _host_state = frozenset({"global_step", "mask_seed"})
    _integer_state = {"global_step": torch.int64, "mask_seed": torch.int64}
    _validate = staticmethod(_validate_group)

    def _validate_params(self, group: dict[str, Any]) -> None:
        """Also refuse a density that keeps no coordinate of one of the group's matrices (it would never move)."""
        super()._validate_params(group)
        if group["density"] >= 1.0:
            return
        for param in group["params"]:
            numel = _real_numel(param)
            stratum = min(numel, sparse.STRATUM)  # coordinates are drawn per stratum of this many
            if param.dim() == 2 and round(group["density"] * stratum) == 0:
                raise ValueError(f"Invalid density value: {group['density']!r} (keeps no coordinate of a "
                                 f"{'x'.join(map(str, param.shape))} matrix, or of its {sparse.STRATUM}-element "
                                 f"strata, which would never move: use more than {0.5 / stratum:.3g})")

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
        compiled: bool | None = None,
        capturable: bool = False,
        skip_nonfinite: bool = True,
        reference_compat: bool = False,
        fp32_moments: bool = True,
        keep_positions: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, threshold=threshold,
            reset_interval=reset_interval, warmup_steps=warmup_steps, clip_delay=clip_delay, density=density,
            bias_correction_reset=bias_correction_reset, maximize=maximize, foreach=foreach,
            fused=fused, compiled=compiled, capturable=capturable, skip_nonfinite=skip_nonfinite,
            reference_compat=reference_compat, fp32_moments=fp32_moments, keep_positions=keep_positions,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if 0 < group["reset_interval"] <= group["warmup_steps"]:
                warnings.warn(f"warmup_steps={group['warmup_steps']} >= reset_interval={group['reset_interval']}: "
                              "the post-reset warmup never completes, so after the first reset every update is "
                              "scaled by less than 1 for the rest of training", stacklevel=2)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in _SPAM_DEFAULT_FLAGS.items():
            for group in self.param_groups:
                group.setdefault(key, value)

    # ----------------------------------------------------------------------------------------- state

    def _init_state(self, param: Tensor, group: dict[str, Any], completed: int | Tensor, ordinal: int) -> None:
        sparse_matrix = group["density"] < 1.0 and param.dim() == 2
        shard = sharding.row_shard(param) if sparse_matrix else None  # refuses other layouts before any state
        state = self.state[param]
        state["step"] = torch.zeros((), dtype=scalar_dtype(), device=param.device)
        state.update(self._new_clock(param, group, completed))
        if sparse_matrix:
            numel, dtype = _real_numel(param), param.real.dtype
            seed = sparse.param_seed(torch.initial_seed(), ordinal)
            if shard is not None:
                seed = sharding.broadcast_seed(seed, shard, param.device)
            generation = schedule.mask_generation(completed + 1, group["reset_interval"])
            state["mask_seed"] = torch.tensor(seed, dtype=torch.int64)
            state["mask_bits"] = sparse.draw_mask(numel, group["density"], seed, generation, param.device)
            kept = (sparse.kept_count(numel, group["density"]) if shard is None
                    else sparse.count_kept(state["mask_bits"], shard.start, shard.end))
            moment = moment_dtype(dtype, group["fp32_moments"])
            state["exp_avg"] = torch.zeros(kept, dtype=moment, device=param.device)
            state["exp_avg_sq"] = torch.zeros(kept, dtype=moment, device=param.device)
        else:
            moment = moment_dtype(param.dtype, group["fp32_moments"])
            state["exp_avg"] = torch.zeros_like(param, dtype=moment, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=moment, memory_format=torch.preserve_format)

    def _redraw_due_masks(self, current: int | Tensor) -> None:
        """At the end of steps ``kΔT − 1`` draw each sparse matrix's next subset; its moments restart at zero."""
        for group in self.param_groups:
            interval = group["reset_interval"]
            if group["capturable"] or not schedule.is_mask_redraw_step(current, interval):
                continue
            generation = schedule.mask_generation(current + 1, interval)
            for param in group["params"]:
                state = self.state.get(param)
                if not state or "mask_bits" not in state:
                    continue
                seed = int(state["mask_seed"])
                state["mask_bits"] = sparse.draw_mask(_real_numel(param), group["density"], seed, generation,
                                                      param.device)
                shard = sharding.row_shard(param)
                if shard is None:
                    state["exp_avg"].zero_()
                    state["exp_avg_sq"].zero_()
                else:  # the kept count inside this rank's rows changes with the draw (see .sharding)
                    kept = sparse.count_kept(state["mask_bits"], shard.start, shard.end)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = state[key].new_zeros(kept)

    def _sharded_sparse(self, param: Tensor) -> tuple[dict[str, Any], sharding.RowShard] | None:
        """The state and row range of a sparse matrix split across ranks (FSDP2), or None."""
        state = self.state.get(param)
        if not state or "mask_bits" not in state:
            return None
        shard = sharding.row_shard(param)
        return None if shard is None else (state, shard)

    def _fusable(self, param: Tensor) -> bool:
        """The fused kernel indexes compact moments by whole strata from the tensor's start, which a shard
        boundary need not respect: sparse matrices split across ranks take the foreach step instead."""
        return super()._fusable(param) and self._sharded_sparse(param) is None

    def _has_native_step(self, group: dict[str, Any]) -> bool:
        """Dense groups: the native loop has no sparse path."""
        return group["density"] == 1.0

    def _step_mask_bits(self, param: Tensor, state: dict[str, Any]) -> Tensor | None:
        """The packed mask of the coordinates this process steps (its rows' part of the mask under FSDP2)."""
        bits = state.get("mask_bits")
        shard = None if bits is None else sharding.row_shard(param)
        return bits if shard is None else sparse.slice_bits(bits, shard.start, shard.end)

    def kept_positions(self) -> dict[Tensor, Tensor]:
        """The kept positions held between steps (``keep_positions=True``), per sparse matrix: memory the optimizer
        keeps beside its state (not in ``state``, not saved), to count with it. Empty when no group keeps them."""
        return {param: entry[2] for param, entry in self.__dict__.get("_positions", {}).items()}

    def _kept_positions(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]],
                        bits: list[Tensor | None]) -> list[Tensor | None] | None:
        """The kept positions of the group's sparse matrices when it keeps them (``keep_positions``): found once
        per mask (a new mask is a new tensor: drawn, loaded or sliced for a shard) and kept in int32."""
        kept: dict[Tensor, tuple[Tensor, int, Tensor]] = self.__dict__.setdefault("_positions", {})
        if not group["keep_positions"]:
            if kept:  # the group kept them before its setting changed
                for param in params:
                    kept.pop(param, None)
            return None
        positions: list[Tensor | None] = []
        for param, state, local_bits in zip(params, states, bits):
            source = state.get("mask_bits")
            if local_bits is None or source is None:
                positions.append(None)
                continue
            entry = kept.get(param)
            if entry is None or entry[0] is not source or entry[1] != source._version:
                numel = real_view(local(param)).numel()
                found = sparse.kept_index(local_bits, numel)
                entry = kept[param] = (source, source._version, found.int() if numel < 2**31 else found)
            positions.append(entry[2])
        return positions

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``; under FSDP2 a sparse matrix's moments are saved whole (every
        rank's kept coordinates in row order, as one process would hold them), so a checkpoint written by any
        number of processes loads into any other. Then every rank must call this (it gathers)."""
        saved = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in enumerate(params):
            found = self._sharded_sparse(param)
            if found is None:
                continue
            state, shard = found
            offset = sparse.count_kept(state["mask_bits"], 0, shard.start)
            whole = dict(saved["state"][index])  # a new dict: the saved one is the live state
            for key in ("exp_avg", "exp_avg_sq"):
                whole[key] = sharding.gather_compact(state[key], offset, shard)
            saved["state"][index] = whole
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, checked first (see the base class); under FSDP2 each rank keeps its rows' part of a sparse
        matrix's whole moments (see :meth:`state_dict`)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                found = self._sharded_sparse(param)
                if found is None:
                    continue
                state, shard = found
                offset = sparse.count_kept(state["mask_bits"], 0, shard.start)
                kept = sparse.count_kept(state["mask_bits"], shard.start, shard.end)
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = state[key][offset : offset + kept].clone()

    def _saved_shape(self, param: Tensor, group: dict[str, Any], key: str, fresh: Tensor) -> tuple[int, ...]:
        """Sparse moments of a matrix split across ranks are saved whole (see :meth:`state_dict`)."""
        sparse_matrix = group["density"] < 1.0 and param.dim() == 2
        if key in ("exp_avg", "exp_avg_sq") and sparse_matrix and sharding.row_shard(param) is not None:
            return (sparse.kept_count(_real_numel(param), group["density"]),)
        return tuple(fresh.shape)

    # ------------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        loss = self._evaluate(closure)
        completed = self._completed_steps()
        current = completed + 1  # τ, the 1-based index of this step
        batches = self._gather(completed)
        grad_scale, found_inf = self._amp_scaling()
        keep = self._keep(batches, found_inf)
        statistics = _Statistics() if self.record_statistics else None
        for batch in batches:
            if batch.params:
                self._step_group(batch, current, self._group_keep(batch.group, keep, found_inf), grad_scale,
                                 statistics)
        if statistics is not None:
            self.last_statistics = statistics.finish(keep)
        self._advance_clock(keep)
        self._redraw_due_masks(current)
        return loss

    def _step_group(self, batch: GroupBatch, current: int | Tensor, keep: Tensor | None, grad_scale: Tensor | None,
                    statistics: _Statistics | None) -> None:
        """This step's decisions for one group (on the device when capturable), then its arithmetic."""
        group, params = batch.group, batch.params
        if group["capturable"]:
            clock = torch.as_tensor(current, dtype=torch.int64, device=params[0].device)
            reset, threshold, multiplier = schedule.device_decisions(
                clock, group["threshold"], group["reset_interval"], group["warmup_steps"], group["clip_delay"])
        else:
            reset = schedule.is_reset_step(current, group["reset_interval"])
            multiplier = schedule.warmup_multiplier(current, group["reset_interval"], group["warmup_steps"])
            clipping = schedule.clipping_active(current, group["threshold"], group["reset_interval"],
                                                group["clip_delay"])
            threshold = group["threshold"] if clipping else 0.0
        beta1, beta2 = group["betas"]
        settings = SpamStep(lr=scalar_lr(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"], threshold=threshold, reset=reset,
                            warmup_multiplier=multiplier, bias_correction_reset=group["bias_correction_reset"],
                            maximize=group["maximize"], density=group["density"],
                            clip_unseen=group["reference_compat"])
        states = [self.state[p] for p in params]
        clip_counts: list[Tensor | None] | None = [None] * len(params) if statistics is not None else None
        bits = [self._step_mask_bits(p, s) for p, s in zip(params, states)]
        spam([local(p) for p in params], [local(g) for g in batch.grads], [local(s["exp_avg"]) for s in states],
             [local(s["exp_avg_sq"]) for s in states], [s["step"] for s in states], bits, settings, keep=keep,
             implementation=self._implementation(group, params), clip_counts=clip_counts, grad_scale=grad_scale,
             num_warps=self.fused_num_warps, kept_positions=self._kept_positions(group, params, states, bits))
        if statistics is not None:
            statistics.add(params, clip_counts, reset, multiplier, device_decided=group["capturable"])


class _Statistics:
    """What one step did, for :attr:`SPAM.last_statistics` (device values stay on the device)."""

    def __init__(self) -> None:
        self.clipped: dict[Tensor, Tensor] = {}
        self.reset: bool | Tensor = False
        self.warmup_multiplier: float | Tensor = 1.0

    def add(self, params: list[Tensor], clip_counts: list[Tensor | None], reset: bool | Tensor,
            multiplier: float | Tensor, device_decided: bool) -> None:
        self.clipped.update((p, c) for p, c in zip(params, clip_counts) if c is not None)
        if device_decided:  # device values: comparing them here would synchronise
            self.reset, self.warmup_multiplier = reset.bool(), multiplier
        else:
            self.reset = self.reset or reset
            self.warmup_multiplier = min(self.warmup_multiplier, multiplier)

    def finish(self, keep: Tensor | None) -> dict[str, Any]:
        return {"clipped": self.clipped, "reset": self.reset, "warmup_multiplier": self.warmup_multiplier,
                "skipped": None if keep is None else ~keep}


def _real_numel(param: Tensor) -> int:
    return param.numel() * (2 if param.is_complex() else 1)


# Keyword-only arguments added after the first release; older pickles get them from the signature.
_SPAM_DEFAULT_FLAGS = {
    name: arg.default for name, arg in inspect.signature(SPAM.__init__).parameters.items()
    if arg.kind is inspect.Parameter.KEYWORD_ONLY
}
