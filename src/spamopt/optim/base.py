"""The machinery an Adam-family optimizer of this package shares, the way ``torch.optim.AdamW`` reuses Adam's:
argument validation, gathering each group's parameters with lazily created state, ``torch.amp.GradScaler``
handling, the device-side non-finite skip, DTensor (FSDP2) shards, the step clock, dtype-preserving state
loading and the choice of implementation. A subclass adds its defaults, its state and one ``step``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import sparse

__all__ = [
    "GroupBatch",
    "SpikeAwareOptimizer",
    "check_flag",
    "check_integer",
    "check_number",
    "gradient_copy",
    "inverse_scale",
    "real_view",
    "is_distributed_tensor",
    "local",
    "moment_dtype",
    "scalar_dtype",
    "scalar_lr",
    "validate_common",
]

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------- validation


def check_number(name: str, value: Any, low: float, *, low_open: bool = False, high: float = math.inf,
                 high_open: bool = True, accepted: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the ``accepted`` range unless ``value`` is a finite real in it."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"Invalid {name} value: {value!r} ({accepted})")


def check_integer(name: str, value: Any, accepted: str) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ≥ 0."""
    if not (isinstance(value, Integral) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"Invalid {name} value: {value!r} ({accepted})")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r} (must be True or False)")


def scalar_dtype() -> torch.dtype:
    """The dtype of the ``step`` count: float64 when that is torch's default dtype, else float32 (as torch's own
    optimizers do)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def scalar_lr(lr: float | Tensor) -> float | Tensor:
    """A tensor learning rate of any 1-element shape (``[1, 1]`` too) as a 0-dim view, which broadcasts into
    every parameter, 0-dim ones included; a view, so a captured CUDA graph still reads its current value."""
    return lr.view(()) if isinstance(lr, Tensor) else lr


def validate_common(group: dict[str, Any]) -> None:
    """The arguments every optimizer here shares: lr, betas, eps, weight_decay, maximize, skip_nonfinite and the
    implementation flags foreach / fused / capturable."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr_value = lr.item()
    else:
        lr_value = lr
    if not (isinstance(lr_value, Real) and not isinstance(lr_value, bool) and 0 <= lr_value < math.inf):
        raise ValueError(f"Invalid learning rate: {lr_value!r} (must be a finite number >= 0)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas value: {betas!r} (must be a pair (beta1, beta2))")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            raise ValueError("betas must be floats; tensor betas are not supported")
        if not (isinstance(beta, Real) and not isinstance(beta, bool) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {index}: {beta!r} (must be in [0, 1))")
    check_number("epsilon", group["eps"], 0.0, accepted="must be a finite number >= 0")
    check_number("weight_decay", group["weight_decay"], 0.0, accepted="must be a finite number >= 0")
    for flag in ("maximize", "skip_nonfinite", "capturable"):
        check_flag(flag, group[flag])
    if group["capturable"] and (group["fused"] is False or group["foreach"] or group.get("compiled")):
        raise ValueError("Invalid capturable value: True (needs the fused implementation: fused=True or None)")
    for flag in ("foreach", "fused", "compiled"):
        if group.get(flag) is not None:
            check_flag(flag, group[flag])
    chosen = [flag for flag in ("foreach", "fused", "compiled") if group.get(flag)]
    if len(chosen) > 1:
        raise ValueError(f"Invalid {'/'.join(chosen)} values: all True (choose one implementation)")


# ---------------------------------------------------------------------------------------- tensors


# Group keys that choose how a step is computed, not what it computes: a state dict without them (written by an
# older version) loads with the optimizer's own. Any other missing key is refused.
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "compiled", "capturable", "differentiable", "keep_positions"})
# Settings added after the first release: a state dict written before them may lack them (the default applies).
LATER_SETTINGS = frozenset({"fp32_moments"})


def _dtype_kind(dtype: torch.dtype) -> str | torch.dtype:
    """Floating state may come in another float precision (older checkpoints); anything else must match."""
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else dtype


def moment_dtype(dtype: torch.dtype, fp32_moments: bool = True) -> torch.dtype:
    """Moments of half-precision parameters are kept in float32 (v underflows in bf16/fp16), unless
    ``fp32_moments`` is False: then in the parameter's dtype, as torch's AdamW keeps them."""
    return torch.float32 if fp32_moments and dtype in (torch.float16, torch.bfloat16) else dtype


def is_distributed_tensor(tensor: Tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2): an elementwise step updates each rank's shard on its own."""
    return tensor.to_local() if is_distributed_tensor(tensor) else tensor


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as its real view (pairs), a real one as itself."""
    return torch.view_as_real(t) if t.is_complex() else t


def gradient_copy(grad: Tensor, kept: Tensor | None, keep: Tensor | None, maximize: bool, dtype: torch.dtype,
                   inverse_scale: Tensor | None) -> Tensor:
    """A private, finite, unscaled copy of the gradient in ``dtype`` (for a sparse parameter only its kept
    coordinates, ``kept`` from :func:`.sparse.kept_index`)."""
    g = grad if kept is None else sparse.gather(grad, kept)
    if keep is None:  # no skipping: non-finite coordinates count as zero gradient
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        g = torch.where(keep, g, 0.0)
    g = g.to(dtype)
    if inverse_scale is not None:
        g.mul_(inverse_scale.to(g.device, non_blocking=True))
    return g.neg_() if maximize else g


def inverse_scale(grad_scale: Tensor | None) -> Tensor | None:
    """``1 / grad_scale`` as a 0-dim float32 device tensor, as ``torch.amp.GradScaler.unscale_`` computes it."""
    return None if grad_scale is None else grad_scale.double().reciprocal().float().reshape(())


def buckets_by_device_and_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), the unit a multi-tensor (foreach) kernel takes."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return buckets


def keep_on(keep: Tensor | None, device: torch.device) -> tuple[Tensor | None, float | Tensor]:
    """The step's skip flag on ``device`` (or None) and as a float64 multiplier (1.0 when nothing skips)."""
    if keep is None:
        return None, 1.0
    here = keep.to(device, non_blocking=True)
    return here, here.to(torch.float64)


def _peaks(grads: list[Tensor]) -> Tensor:
    """Each tensor's largest magnitude ``max|g|`` (one device), NaN where a tensor holds NaN, inf where it holds
    ±Inf: so all are finite exactly when every value is. On the CPU the native loop (:mod:`.native`) reads
    them all in one call when they are contiguous float32 (or all float64); otherwise the smallest and largest
    value of each tensor are found in one vectorised pass, six times faster there than the inf-norm that
    CUDA runs fused."""
    if grads[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(grads, float("inf")))
    from . import native

    if native.available() and all(native.eligible(g) and g.dtype == grads[0].dtype for g in grads):
        return native.finite_peaks(grads)[1]  # one multi-threaded pass over them all
    return torch.stack([torch.stack(torch.aminmax(g)) for g in grads]).abs().amax(1)


def finite_peaks(grads: list[Tensor], with_peaks: bool = True) -> tuple[Tensor | None, list[Tensor | None]]:
    """One 0-dim boolean, are all gradients finite (None for no gradients), and each gradient's ``max|g|`` as a
    0-dim tensor on its device (its local shard's for a DTensor; None for an empty one), from one read of every
    gradient, on the device, with no host synchronisation. A peak is exact wherever the flag is True.
    ``with_peaks=False`` leaves every peak None (it saves a view per tensor)."""
    if not grads:
        return None, []
    by_device: dict[torch.device, list[int]] = {}
    reals = [torch.view_as_real(g) if g.is_complex() else g for g in map(local, grads)]
    for i, g in enumerate(reals):
        # Empty tensors (and empty FSDP shards) hold nothing non-finite; inf-norms of them are undefined.
        if g.numel():
            by_device.setdefault(g.device, []).append(i)
    peaks: list[Tensor | None] = [None] * len(grads)
    if not by_device:
        return torch.ones((), dtype=torch.bool, device=reals[0].device), peaks
    flags = []
    for index in by_device.values():
        found = _peaks([reals[i] for i in index])
        flags.append(found.isfinite().all())
        if with_peaks:
            for i, peak in zip(index, found.unbind(0)):
                peaks[i] = peak
    home = flags[0].device
    return torch.stack([f.to(home, non_blocking=True) for f in flags]).all(), peaks


def all_finite(grads: list[Tensor]) -> Tensor | None:
    """One 0-dim boolean: are all gradients finite? Computed on the device, no host synchronisation."""
    return finite_peaks(grads, with_peaks=False)[0]


@dataclass
class GroupBatch:
    """One parameter group's share of a step: the parameters that have a gradient, and those gradients."""

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]


# -------------------------------------------------------------------------------------- optimizer


class SpikeAwareOptimizer(Optimizer):
    """Base class: everything but the defaults, the state layout and the arithmetic.

    Subclasses set :attr:`_host_state` / :attr:`_integer_state` (state entries kept on the CPU and their
    dtypes), implement :meth:`_init_state` and ``step``, and call :meth:`_gather`, :meth:`_keep`,
    :meth:`_implementation` and :meth:`_advance_clock` from it. Per-parameter state always holds
    ``global_step`` (the step clock) and ``skipped_steps``.
    """

    # torch.amp.GradScaler hands the optimizer its loss scale and inf flag (as the attributes ``grad_scale``
    # and ``found_inf``, for the duration of ``step``) instead of unscaling the gradients and reading the flag
    # on the host.
    _step_supports_amp_scaling = True
    #: State entries that stay on the CPU (counters the host reads), and dtypes of integer state entries.
    _host_state: frozenset[str] = frozenset({"global_step"})
    _integer_state: dict[str, torch.dtype] = {"global_step": torch.int64}
    _validate: Callable[[dict[str, Any]], None] = staticmethod(validate_common)

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._validate(defaults)
        super().__init__(params, defaults)
        # torch.optim.Optimizer.__setstate__ adds this key; set it here so copies and pickles compare equal.
        self.defaults.setdefault("differentiable", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate(group)
        if self.param_groups and group["capturable"] != self.param_groups[0]["capturable"]:
            raise ValueError("Invalid capturable value: every parameter group must use the same (one clock)")
        super().add_param_group(param_group)
        try:
            self._validate_params(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate_params(self, group: dict[str, Any]) -> None:
        """Refuse parameters this optimizer cannot step (integer dtypes); subclasses add their own rules."""
        for param in group["params"]:
            if not (param.is_floating_point() or param.is_complex()):
                raise ValueError(f"Invalid parameter dtype: {param.dtype} (a parameter of shape "
                                 f"{tuple(param.shape)}; {type(self).__name__} steps floating-point or complex "
                                 "parameters only)")

    # ------------------------------------------------------------------------------------- state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer`` but keep each state tensor's own dtype and home device.

        The base class casts every floating state tensor except ``step`` to its parameter's dtype (and ints to
        floats for floating parameters), which would corrupt integer clocks, seeds and bitmasks.
        """
        self._check_loadable(state_dict)
        saved = state_dict["state"]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        on_host = self._host_state - ({"global_step"} if self.param_groups[0]["capturable"] else set())
        for pid, param in zip(saved_ids, params):
            if pid not in saved:
                continue
            restored = self.state[param]
            for key, value in saved[pid].items():
                device = torch.device("cpu") if key in on_host else param.device
                if isinstance(value, Tensor):
                    restored[key] = value.to(device=device)
                elif key in self._integer_state or key in ("step", "skipped_steps"):
                    dtype = self._integer_state.get(key, torch.float32)
                    restored[key] = torch.tensor(value, dtype=dtype, device=device)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Refuse, before anything changes, a state dict this optimizer did not write or cannot continue from:
        groups lacking any of its settings (another optimizer's state), settings its constructor would refuse,
        and per-parameter state with missing entries, other shapes or other kinds of dtype than a fresh state."""
        name = type(self).__name__
        groups, states = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(states, dict):
            raise ValueError("Invalid state_dict: not an optimizer state dict (needs 'state' and 'param_groups')")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"Invalid state_dict: {len(groups)} parameter groups where {name} has "
                             f"{len(self.param_groups)}")
        ordinal = 0
        for index, (saved, group) in enumerate(zip(groups, self.param_groups)):
            missing = sorted(set(self.defaults) - set(saved) - IMPLEMENTATION_FLAGS - LATER_SETTINGS)
            if missing:
                raise ValueError(f"Invalid state_dict: parameter group {index} has no {', '.join(missing)}: it was "
                                 f"not written by {name} (another optimizer's state?)")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"Invalid state_dict: parameter group {index} holds {len(saved['params'])} "
                                 f"parameters where {name}'s holds {len(group['params'])}")
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            try:
                self._validate(merged)
                self._validate_params(merged)
            except ValueError as error:
                raise ValueError(f"Invalid state_dict: parameter group {index}: {error}") from None
            for pid, param in zip(saved["params"], group["params"]):
                ordinal += 1
                if pid in states:
                    self._check_param_state(param, merged, states[pid], ordinal - 1, f"parameter {pid}")

    def _check_param_state(self, param: Tensor, group: dict[str, Any], saved: dict[str, Any], ordinal: int,
                           where: str) -> None:
        """``saved`` holds every entry of a fresh state for ``param``, in its shape and kind of dtype."""
        fresh, self.state = self.state, defaultdict(dict)
        try:
            self._init_state(param, group, 0, ordinal)
            template = self.state[param]
        finally:
            self.state = fresh
        for key, expected in template.items():
            if key not in saved:
                raise ValueError(f"Invalid state_dict: {where} has no {key!r} state")
            value = saved[key]
            if not isinstance(value, Tensor):
                if key in ("step", "skipped_steps") and isinstance(value, Real) and not isinstance(value, bool):
                    continue  # a plain number, as older torch versions saved counters
                raise ValueError(f"Invalid state_dict: {where}'s {key!r} is a {type(value).__name__}, not a tensor")
            shape = self._saved_shape(param, group, key, expected)
            if tuple(value.shape) != shape:
                raise ValueError(f"Invalid state_dict: {where}'s {key!r} has shape {tuple(value.shape)} where "
                                 f"{shape} is expected (another model, or another density?)")
            if _dtype_kind(value.dtype) != _dtype_kind(expected.dtype):
                raise ValueError(f"Invalid state_dict: {where}'s {key!r} is {value.dtype} where "
                                 f"{expected.dtype} is expected")

    def _saved_shape(self, param: Tensor, group: dict[str, Any], key: str, fresh: Tensor) -> tuple[int, ...]:
        """The shape ``state_dict`` gives the state entry ``key`` whose fresh value is ``fresh``."""
        return tuple(fresh.shape)

    def _init_state(self, param: Tensor, group: dict[str, Any], completed: int | Tensor, ordinal: int) -> None:
        """Create ``self.state[param]`` before the parameter's first step; ``ordinal`` is its position."""
        raise NotImplementedError

    def _new_clock(self, param: Tensor, group: dict[str, Any], completed: int | Tensor) -> dict[str, Tensor]:
        """``global_step`` (on the device when capturable, else the CPU) and ``skipped_steps`` for a new state."""
        if group["capturable"]:
            clock = torch.as_tensor(completed, dtype=torch.int64).to(param.device, copy=True)
        else:
            clock = torch.tensor(completed, dtype=torch.int64)
        return {"global_step": clock, "skipped_steps": torch.zeros((), dtype=torch.float32, device=param.device)}

    def _completed_steps(self) -> int | Tensor:
        """Steps taken so far: an int, or with ``capturable`` the device clock itself (reading it would sync)."""
        for state in self.state.values():
            if "global_step" in state:
                clock = state["global_step"]
                return clock.clone() if self.param_groups[0]["capturable"] else int(clock)
        return 0

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

    # -------------------------------------------------------------------------------------- step

    @staticmethod
    def _evaluate(closure: Callable[[], float] | None) -> float | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _gather(self, completed: int | Tensor) -> list[GroupBatch]:
        """Each group's parameters that have a gradient, creating the state of those stepping for the first
        time. Parameter ordinals count every parameter of every group, with or without a gradient."""
        ordinal = 0
        batches = []
        for group in self.param_groups:
            batch = GroupBatch(group, [], [])
            for param in group["params"]:
                ordinal += 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if not self.state[param]:
                    self._init_state(param, group, completed, ordinal - 1)
                batch.params.append(param)
                batch.grads.append(param.grad)
            batches.append(batch)
        return batches

    def _amp_scaling(self) -> tuple[Tensor | None, Tensor | None]:
        """``(grad_scale, found_inf)`` set by ``torch.amp.GradScaler.step`` for this call, or ``(None, None)``."""
        return getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    def _keep(self, batches: list[GroupBatch], found_inf: Tensor | None) -> Tensor | None:
        """This step's 0-dim ``keep`` flag (False: skip it), or None when no group skips."""
        return self._keep_and_peaks(batches, found_inf, with_peaks=False)[0]

    def _keep_and_peaks(self, batches: list[GroupBatch], found_inf: Tensor | None,
                        with_peaks: bool = True) -> tuple[Tensor | None, dict[int, Tensor]]:
        """This step's 0-dim ``keep`` flag (False: skip it; None when no group skips) and, keyed by ``id`` of
        each gradient the check read, its ``max|g|`` (:func:`finite_peaks`; a kernel that needs it reads it
        from here instead of reading the gradient once more).

        Under ``torch.amp.GradScaler`` the scaler has already checked every gradient (``found_inf``) and every
        group skips a step it flags, as torch's optimizers do; otherwise groups with ``skip_nonfinite`` are
        checked here.
        """
        peaks: dict[int, Tensor] = {}
        if found_inf is not None:
            keep: Tensor | None = found_inf.reshape(()) == 0
        else:
            checked = [g for b in batches if b.group["skip_nonfinite"] for g in b.grads]
            keep, found = finite_peaks(checked, with_peaks)
            peaks = {id(g): peak for g, peak in zip(checked, found) if peak is not None}
        if keep is not None and any(is_distributed_tensor(g) for b in batches for g in b.grads):
            # Each rank sees only its shard: agree on the decision, or ranks would drift apart.
            agreed = keep.to(torch.int32)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            keep = agreed.bool()
        return keep, peaks

    @staticmethod
    def _group_keep(group: dict[str, Any], keep: Tensor | None, found_inf: Tensor | None) -> Tensor | None:
        """The skip flag a group obeys: the step's, if the group skips non-finite steps or a scaler decides."""
        return keep if group["skip_nonfinite"] or found_inf is not None else None

    def _fusable(self, param: Tensor) -> bool:
        """The fused kernel can step this parameter (for a DTensor, its local shard: the step is elementwise)."""
        from .fused import fused_available

        return param.dtype in FUSED_DTYPES and fused_available(local(param).device)

    #: Below this many elements in a group the compiled step is not the default on the CPU: compiling
    #: (13-25 s cold, cached on disk afterwards) would cost more than it saves in a short run; at 9M
    #: elements a run repays it after about 600 steps (benchmarks/compile_threshold.py).
    compile_min_numel: int = 10_000_000

    def _compilable(self, param: Tensor) -> bool:
        """The compiled implementation can step this parameter: a real or complex float tensor where
        ``torch.compile`` can build kernels."""
        from .compiled import compiled_available

        return (param.is_floating_point() or param.is_complex()) and compiled_available(local(param).device.type)

    def _has_native_step(self, group: dict[str, Any]) -> bool:
        """The native loops (:mod:`.native`) implement this group's step (none here; subclasses say where)."""
        return False

    def _natively_stepped(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """The compiled step would run this whole group (float32/float64 parameters) on the native loops, which
        take no torch.compile time, so it is the CPU default at any size."""
        from . import native

        return self._has_native_step(group) and native.available() and all(
            real_view(local(p).detach()).dtype in native.SUPPORTED_DTYPES for p in params)

    def _implementation(self, group: dict[str, Any], params: list[Tensor]) -> str:
        """``"fused"``, ``"compiled"``, ``"foreach"`` or ``"forloop"`` for this group's parameters.

        ``fused=None``, ``compiled=None`` and ``foreach=None`` (the defaults) pick fused where it runs compiled
        (CUDA with Triton, every parameter qualifying), else the compiled step on a CPU with a C++ compiler for
        groups of at least :attr:`compile_min_numel` elements or that the native loops take whole, else
        foreach on CUDA, else the for-loop reference.
        """
        compiled = group.get("compiled")
        if compiled is None:
            compiled = (group["fused"] is None and group["foreach"] is None and not group["capturable"] and all(
                p.device.type == "cpu" and self._compilable(p) for p in params)
                and (sum(p.numel() for p in params) >= self.compile_min_numel or self._natively_stepped(group, params)))
        elif compiled and not all(self._compilable(p) for p in params):
            raise RuntimeError(f"compiled=True needs torch.compile's backend for every parameter (a C++ compiler on "
                               f"the CPU, Triton on CUDA) and an optimizer with a compiled step "
                               f"({type(self).__name__})")
        if compiled:
            return "compiled"
        foreach, fused = group["foreach"], group["fused"]
        if fused is None:
            fused = foreach is None and all(p.is_cuda and self._fusable(p) for p in params)
        elif fused and not all(self._fusable(p) for p in params):
            raise RuntimeError("fused=True needs Triton and real float32/bfloat16/float16 parameters on CUDA "
                               "(or on the CPU with TRITON_INTERPRET=1)")
        if fused:
            return "fused"
        if foreach is None:
            foreach = all(p.is_cuda for p in params)
        return "foreach" if foreach else "forloop"
