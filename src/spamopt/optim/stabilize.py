r"""AdaClip and AdaGN, Stable-SPAM's two gradient transformations (Huang et al., arXiv 2502.17055), on their own:
the per-tensor arithmetic :class:`spamopt.StableSPAM` uses, and :class:`AdaClipGN`, which puts them in front of
any torch optimizer (the paper's Table 3 does so for Lion and Adam-mini).

Per parameter tensor, with ``n`` the number of steps its statistics have seen (including this one) and ``g``
a private copy of its gradient::

    AdaClip  μ = max|g|;  M ← γ3·M + (1 − γ3)·μ;  M̂ = M / (1 − γ3^n)
             where |g| > M̂:  g ← g · M̂/μ   ("scale", the paper's rule: the largest lands exactly on M̂)
                             g ← sign(g)·M̂  ("clamp")
    AdaGN    r = ‖g‖₂;  a ← γ1·a + (1 − γ1)·r;  b ← γ2·b + (1 − γ2)·r²
             â = a / (1 − γ1^n);  b̂ = b / (1 − γ2^n);  if r > 0:  g ← g / r · â / (sqrt(b̂) + ε)

All statistics are 0-dim float64 tensors on the parameter's device (no host synchronisation): any finite
gradient's ``r²`` fits in float64, and ``r`` itself is computed without overflow (:func:`safe_norm`), so one
huge but finite coordinate cannot turn the statistics, and with them the weights, into inf or NaN. ``keep`` (0
for a skipped step) multiplies every change away, so a skipped step leaves the statistics as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .base import all_finite, check_flag, check_number, is_distributed_tensor, local, moment_dtype

__all__ = ["AdaClipGN", "ADACLIP_MODES", "adaclip_", "adagn_", "new_statistics", "safe_norm", "norm_scale",
           "shard_group", "stabilize_shards_"]

ADACLIP_MODES = ("scale", "clamp", "off")  # "off": StableSPAM's ablations only
STATISTICS = ("stat_step", "max_ema", "norm_ema", "norm_sq_ema")  # n, M, a, b


def new_statistics(param: Tensor, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Zeroed ``n, M, a, b`` for ``param``: float64 unless ``dtype`` is given (or the device has no float64)."""
    if dtype is None:
        dtype = torch.float32 if param.device.type == "mps" else torch.float64
    return {key: torch.zeros((), dtype=dtype, device=param.device) for key in STATISTICS}


def norm_scale(peak: Tensor) -> Tensor:
    """A power of two ``s`` with ``peak·s`` in [0.5, 1) (1 for a zero or non-finite ``peak``): scaling by it is
    exact, and squares of values up to ``peak·s`` cannot overflow."""
    mantissa, exponent = torch.frexp(peak)
    usable = (mantissa != 0) & torch.isfinite(peak)
    return torch.where(usable, torch.ldexp(torch.ones_like(peak), -exponent), torch.ones_like(peak))


def safe_norm(g: Tensor, peak: Tensor | None = None) -> Tensor:
    """``‖g‖₂`` as a float64 0-dim tensor, for any finite ``g`` (``peak``: an upper bound of ``max|g|`` if
    known). The squares are summed after an exact power-of-two scaling (:func:`norm_scale`), so the result
    equals ``torch.linalg.vector_norm(g)`` bit for bit wherever that one does not overflow."""
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=g.device)
    scale = norm_scale(g.abs().amax() if peak is None else peak.to(g.dtype))
    return torch.linalg.vector_norm(g * scale).double() / scale.double()


def _ema_(average: Tensor, value: Tensor | float, gamma: float | Tensor, keep: float | Tensor) -> None:
    """``average ← γ·average + (1 − γ)·value`` where ``keep`` is 1; unchanged where it is 0."""
    average.mul_(1.0 - (1.0 - gamma) * keep).add_((1.0 - gamma) * keep * value)


def debias_correction(gamma: float | Tensor, count: Tensor) -> Tensor:
    """``1 − γ^count`` in float64 (a float32 counter would round ``γ^count``). ``count`` ≥ 1 after the first
    kept step; clamping spares a 0/0 when the very first step is skipped."""
    return 1.0 - torch.pow(gamma, count.to(torch.float64).clamp(min=1.0))


def _debiased(average: Tensor, gamma: float | Tensor, count: Tensor) -> Tensor:
    """``average / (1 − γ^count)``, the correction from :func:`debias_correction`."""
    return average / debias_correction(gamma, count).to(average.dtype)


def adaclip_(g: Tensor, max_ema: Tensor, count: Tensor, gamma3: float, keep: float | Tensor, mode: str,
             mu: Tensor | None = None) -> Tensor:
    """Clip ``g`` in place against the running maximum of ``max|g|`` (``count``: steps seen, this one included);
    returns ``max|g|`` before clipping (an upper bound of it after). ``mu``: the maximum when ``g`` is a shard
    of the tensor whose maximum counts."""
    if mu is None:
        mu = g.abs().amax() if g.numel() else g.new_zeros(())
    _ema_(max_ema, mu, gamma3, keep)
    bound = _debiased(max_ema, gamma3, count).to(g.dtype)
    spiked = g.abs() > bound
    if mode == "scale":
        clipped = g * (bound / mu)  # μ > 0 wherever a coordinate spiked
    elif mode == "clamp":
        clipped = torch.sign(g) * bound
    else:
        raise ValueError(f"Invalid adaclip value: {mode!r} ('scale' or 'clamp')")
    torch.where(spiked, clipped, g, out=g)
    return mu


def adagn_(g: Tensor, norm_ema: Tensor, norm_sq_ema: Tensor, count: Tensor, gamma1: float | Tensor, gamma2: float,
           eps: float, keep: float | Tensor, peak: Tensor | None = None, r: Tensor | None = None) -> None:
    """Rescale ``g`` in place so that its norm follows the running mean norm, normalised by the running RMS
    (``peak``: an upper bound of ``max|g|`` if known, saving a pass; ``r``: the norm when ``g`` is a shard of
    the tensor whose norm counts)."""
    r = (safe_norm(g, peak) if r is None else r).to(norm_ema.dtype)
    _ema_(norm_ema, r, gamma1, keep)
    _ema_(norm_sq_ema, r * r, gamma2, keep)
    target = _debiased(norm_ema, gamma1, count) / (_debiased(norm_sq_ema, gamma2, count).sqrt() + eps)
    g.mul_(torch.where(r > 0, target / r, 1.0).to(g.dtype))


def stabilize_shards_(gs: list[Tensor], statistics: list[dict[str, Tensor]], counts: list[Tensor], *, gamma1: float,
                      gamma2: float, gamma3: float, eps: float, keep: float | Tensor, adaclip: str, adagn: bool,
                      group: Any) -> None:
    """AdaClip then AdaGN in place on ``gs``, each the local shard of a tensor sharded over the process
    ``group`` (FSDP2), with every tensor's maximum and norm taken over the whole tensor, as on one process: one
    all-reduce (max) of all the tensors' peaks, then one (sum) of their squares, scaled by a power of two so
    that no square overflows. ``counts`` (``n``) are advanced here."""
    for count in counts:
        count.add_(keep)
    peaks = torch.stack([g.abs().amax().double() if g.numel() else g.new_zeros((), dtype=torch.float64)
                         for g in gs])
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
    if adaclip != "off":
        for g, stats, count, mu in zip(gs, statistics, counts, peaks.unbind(0)):
            adaclip_(g, stats["max_ema"], count, gamma3, keep, adaclip, mu=mu.to(g.dtype))
    if not adagn:
        return
    scales = norm_scale(peaks)
    squares = torch.stack([(g * scale.to(g.dtype)).square().sum().double() for g, scale in zip(gs, scales)])
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    norms = squares.sqrt() / scales
    for g, stats, count, r in zip(gs, statistics, counts, norms.unbind(0)):
        adagn_(g, stats["norm_ema"], stats["norm_sq_ema"], count, gamma1, gamma2, eps, keep, r=r)


def shard_group(params: list[Tensor]) -> Any:
    """The process group the parameters' shards are spread over (FSDP2 DTensors sharded on a 1-D mesh), or
    None for whole tensors (one process, DDP, or replicated DTensors)."""
    from .base import is_distributed_tensor

    sharded = [p for p in params if is_distributed_tensor(p) and any(pl.is_shard() for pl in p.placements)]
    if not sharded:
        return None
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1 or any(p.device_mesh != mesh for p in sharded):
        raise NotImplementedError("AdaClip / AdaGN statistics under FSDP2 support one 1-D device mesh")
    return mesh.get_group()


def validate_stabilizer(gamma1: float, gamma2: float, gamma3: float, eps: float, adaclip: str) -> None:
    for name, value in (("gamma2", gamma2), ("gamma3", gamma3)):
        check_number(name, value, 0.0, high=1.0, accepted="must be in [0, 1)")
    if gamma1 != -1:
        check_number("gamma1", gamma1, 0.0, high=1.0, accepted="must be in [0, 1), or -1 for beta1")
    check_number("epsilon", eps, 0.0, accepted="must be a finite number >= 0")
    if adaclip not in ADACLIP_MODES:
        raise ValueError(f"Invalid adaclip value: {adaclip!r} (one of {', '.join(map(repr, ADACLIP_MODES))})")


class AdaClipGN(Optimizer):
    """Any torch optimizer behind AdaClip and AdaGN: ``AdaClipGN(torch.optim.AdamW(params, lr=1e-3))``.

    Each ``step()`` hands the wrapped optimizer, for every parameter with a gradient, a transformed private
    copy of the gradient (AdaClip, then AdaGN; module docstring) and puts the user's ``p.grad`` back afterwards,
    unchanged. The statistics ``n, M, a, b`` live in the wrapped optimizer's per-parameter state under the keys
    ``adaclipgn.stat_step`` etc., so ``state_dict``, ``load_state_dict``, ``torch.distributed.checkpoint`` and
    LR schedulers see one optimizer (the parameter groups are the wrapped optimizer's). A step with a
    non-finite gradient (``skip_nonfinite``) changes no statistic and passes zero gradients on, so the wrapped
    optimizer's own update is the only change; use an optimizer that skips them itself if that matters.

    Args:
        optimizer: the optimizer to wrap (its param groups and state are shared, not copied).
        gamma1: AdaGN's decay of the mean norm ``a`` (-1: the wrapped optimizer's ``betas[0]``).
        gamma2: AdaGN's decay of the mean squared norm ``b``.
        gamma3: AdaClip's decay of the running maximum ``M``.
        eps: AdaGN's ε.
        adaclip: ``"scale"`` (the paper's rule) or ``"clamp"``.
    """

    PREFIX = "adaclipgn."

    def __init__(self, optimizer: Optimizer, *, gamma1: float = 0.7, gamma2: float = 0.9, gamma3: float = 0.999,
                 eps: float = 1e-8, adaclip: str = "scale", skip_nonfinite: bool = True) -> None:
        validate_stabilizer(gamma1, gamma2, gamma3, eps, adaclip)
        check_flag("skip_nonfinite", skip_nonfinite)
        if gamma1 == -1:
            if "betas" not in optimizer.defaults:
                raise ValueError(f"Invalid gamma1 value: -1 (it stands for the wrapped optimizer's betas[0], and "
                                 f"{type(optimizer).__name__} has no betas: give gamma1 in [0, 1))")
            gamma1 = optimizer.defaults["betas"][0]
        self.optimizer = optimizer
        self.settings = dict(gamma1=gamma1, gamma2=gamma2, gamma3=gamma3, eps=eps, adaclip=adaclip,
                             skip_nonfinite=skip_nonfinite)
        super().__init__(optimizer.param_groups, optimizer.defaults)  # the same group dicts
        self._share()

    def _share(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def __repr__(self) -> str:
        return f"AdaClipGN({self.settings}, {self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:  # torch's keeps only defaults, state and groups
        return {**super().__getstate__(), "optimizer": self.optimizer, "settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._share()

    def _step_wrapped(self) -> None:
        """The wrapped optimizer's step with its own hooks but not the global ones, which this wrapper's step
        has run already (one optimizer step, one run of every hook)."""
        inner = self.optimizer
        step = getattr(type(inner).step, "__wrapped__", None)
        if step is None:
            inner.step()
            return
        for hook in list(inner._optimizer_step_pre_hooks.values()):
            hook(inner, (), {})
        step(inner)
        for hook in list(inner._optimizer_step_post_hooks.values()):
            hook(inner, (), {})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        s = self.settings
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("AdaClipGN does not support sparse gradients (its statistics need dense ones)")
        keep = all_finite([p.grad for p in params]) if s["skip_nonfinite"] else None
        group = shard_group(params)
        if keep is not None and group is not None:  # each rank sees its shards: agree on the decision
            agreed = keep.to(torch.int32)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
            keep = agreed.bool()
        keep_value: float | Tensor = 1.0 if keep is None else keep.double()  # statistics are float64
        fresh: dict[Tensor, dict[str, Tensor]] = {}
        gs, statistics = [], []
        for p in params:
            if p.is_complex():
                raise RuntimeError("AdaClipGN does not support complex parameters")
            stats = {k.removeprefix(self.PREFIX): v for k, v in self.state[p].items() if k.startswith(self.PREFIX)}
            if not stats:
                stats = fresh[p] = new_statistics(p)
            grad = local(p.grad).to(moment_dtype(p.dtype))  # a private copy, in fp32 for half precision
            if keep is None:  # non-finite coordinates count as zero
                gs.append(torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0))
            else:
                gs.append(torch.where(keep, grad, 0))
            statistics.append(stats)
        counts = [stats["stat_step"] for stats in statistics]
        if group is None:
            for g, stats, count in zip(gs, statistics, counts):
                count.add_(keep_value)
                peak = None
                if s["adaclip"] != "off":
                    peak = adaclip_(g, stats["max_ema"], count, s["gamma3"], keep_value, s["adaclip"])
                adagn_(g, stats["norm_ema"], stats["norm_sq_ema"], count, s["gamma1"], s["gamma2"], s["eps"],
                       keep_value, peak)
        else:
            stabilize_shards_(gs, statistics, counts, gamma1=s["gamma1"], gamma2=s["gamma2"], gamma3=s["gamma3"],
                              eps=s["eps"], keep=keep_value, adaclip=s["adaclip"], adagn=True, group=group)
        originals = [(p, p.grad) for p in params]
        for p, g in zip(params, gs):
            if is_distributed_tensor(p.grad):  # the wrapped optimizer gets a sharded gradient, as before
                transformed = p.grad.clone()
                local(transformed).copy_(g)
            else:
                transformed = g.to(p.grad.dtype)
            p.grad = transformed
        try:
            self._step_wrapped()
        finally:
            for p, grad in originals:
                p.grad = grad
        for p, stats in fresh.items():  # after the wrapped optimizer created its own state lazily
            self.state[p].update({self.PREFIX + k: v for k, v in stats.items()})
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (statistics included), through this wrapper's state-dict hooks."""
        for hook in list(self._optimizer_state_dict_pre_hooks.values()):
            hook(self)
        state_dict = self.optimizer.state_dict()
        for hook in list(self._optimizer_state_dict_post_hooks.values()):
            state_dict = hook(self, state_dict) or state_dict
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer, through this wrapper's load-state-dict hooks; the statistics keep
        their own dtype (torch would cast them to the parameter's)."""
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            state_dict = hook(self, state_dict) or state_dict
        self._load_state_dict(state_dict)
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {pid: {k: v for k, v in entries.items() if k.startswith(self.PREFIX)}
                 for pid, entries in state_dict["state"].items()}
        self.optimizer.load_state_dict(state_dict)
        self._share()
        params = [p for group in self.param_groups for p in group["params"]]
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        for pid, p in zip(ids, params):
            for key, value in saved.get(pid, {}).items():
                self.state[p][key] = value.to(p.device) if isinstance(value, Tensor) else value
