"""Optimizers by name, with the paper's parameter groups.

Baselines come from their maintained packages (``torch.optim``, ``adam-mini``, ``galore-torch``, ``zclip``,
``lion-pytorch``), never rewritten here; a missing package raises an ``ImportError`` naming the extra that
installs it. Gradient clippers (global norm, ZClip) run between ``backward()`` and ``step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spamopt import SPAM

from ..extras import require


class GradientClipper:
    """Transforms the gradients of a model in place before the optimizer step; may hold state."""

    def __call__(self, model: nn.Module) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class GlobalNormClipper(GradientClipper):
    def __init__(self, max_norm: float) -> None:
        if not max_norm > 0:
            raise ValueError(f"Invalid max_norm value: {max_norm} (must be > 0)")
        self.max_norm = max_norm

    def __call__(self, model: nn.Module) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)


class ZClipClipper(GradientClipper):
    """ZClip (Kumar et al., 2025) from the ``zclip`` package: z-score clipping of the global gradient norm."""

    _STATE = ("buffer", "initialized", "mean", "var")

    def __init__(self, **options: Any) -> None:
        self.zclip = require("zclip", "baselines").ZClip(**options)

    def __call__(self, model: nn.Module) -> None:
        self.zclip.step(model)

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self.zclip, key) for key in self._STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self._STATE:
            setattr(self.zclip, key, state[key])


@dataclass
class OptimizerSetup:
    optimizer: torch.optim.Optimizer
    clipper: GradientClipper | None = None


def block_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(attention and MLP weight matrices, everything else): the split the paper's sparse and GaLore runs use."""
    matrices, others = [], []
    for name, param in model.named_parameters():
        is_block_matrix = param.dim() == 2 and (".attn." in name or ".mlp." in name)
        (matrices if is_block_matrix else others).append(param)
    return matrices, others


def _adamw(model: nn.Module, lr: float, weight_decay: float, options: dict[str, Any]) -> OptimizerSetup:
    return OptimizerSetup(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


def _adam_clip(model: nn.Module, lr: float, weight_decay: float, options: dict[str, Any]) -> OptimizerSetup:
    max_norm = options.pop("max_norm", 1.0)
    return OptimizerSetup(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **options),
                          GlobalNormClipper(max_norm))


def _zclip(model: nn.Module, lr: float, weight_decay: float, options: dict[str, Any]) -> OptimizerSetup:
    clipper = ZClipClipper(**options)
    return OptimizerSetup(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay), clipper)


def _adafactor(model: nn.Module, lr: float, weight_decay: float, options: dict[str, Any]) -> OptimizerSetup:
    if not hasattr(torch.optim, "Adafactor"):
        raise ImportError(f"adafactor needs torch.optim.Adafactor (torch >= 2.5); this is torch {torch.__version__}")
    return OptimizerSetup(torch.optim.Adafactor(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


def _lion(model: nn.Module, lr: float, weight_decay: float, options: dict[str, Any]) -> OptimizerSetup:
    lion = require("lion_pytorch", "baselines", "lion-pytorch")
    return OptimizerSetup(lion.Lion(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


def _adam_mini(model: nn.Module, lr: float, weight_decay: float, options: dict[str, Any]) -> OptimizerSetup:
    adam_mini = require("adam_mini", "baselines", "adam-mini")
    config = model.config
    options = {"dim": config.hidden, "n_heads": config.heads, "verbose": False, **options}
    optimizer = adam_mini.Adam_mini(model.named_parameters(), lr=lr, weight_decay=weight_decay, **options)
    # Adam-mini partitions by substrings of parameter names (its documented way to adapt to a model); its
    # defaults would take "mlp_norm" for an MLP matrix and miss our q/k/v/o and head.
    optimizer.embd_names = {"embed"}
    optimizer.output_names = {"head."}
    optimizer.wqk_names = {"attn.q.", "attn.k."}
    optimizer.wv_names = {"attn.v."}
    optimizer.attn_proj_names = {"attn.o."}
    optimizer.mlp_names = {"mlp.gate.", "mlp.up.", "mlp.down."}
    return OptimizerSetup(optimizer)


def _galore(model: nn.Module, lr: float, weight_decay: float, options: dict[str, Any]) -> OptimizerSetup:
    galore_torch = require("galore_torch", "galore", "galore-torch")
    matrices, others = block_matrices(model)
    # The GaLore paper's ranks are a quarter of the hidden size at 60M, 350M and 1B.
    galore_group = {"rank": max(1, model.config.hidden // 4), "update_proj_gap": 200, "scale": 0.25,
                    "proj_type": "std", **options}
    groups = [{"params": others}, {"params": matrices, **galore_group}]
    return OptimizerSetup(galore_torch.GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay))


def _spam(model: nn.Module, lr: float, weight_decay: float, options: dict[str, Any]) -> OptimizerSetup:
    return OptimizerSetup(SPAM(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


def _spam_sparse(model: nn.Module, lr: float, weight_decay: float, options: dict[str, Any]) -> OptimizerSetup:
    density = options.pop("density", 0.25)
    matrices, others = block_matrices(model)
    groups = [{"params": matrices, "density": density}, {"params": others}]
    return OptimizerSetup(SPAM(groups, lr=lr, weight_decay=weight_decay, **options))


Builder = Callable[[nn.Module, float, float, dict[str, Any]], OptimizerSetup]

OPTIMIZERS: dict[str, Builder] = {
    "adamw": _adamw,
    "adam-clip": _adam_clip,
    "adafactor": _adafactor,
    "lion": _lion,
    "adam-mini": _adam_mini,
    "galore": _galore,
    "zclip": _zclip,
    "spam": _spam,
    "spam-sparse": _spam_sparse,
}


def build_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                    options: dict[str, Any] | None = None) -> OptimizerSetup:
    """The optimizer ``name`` for ``model`` (an unwrapped or FSDP2-sharded :class:`Llama`); ``options`` are
    passed to its constructor (SPAM's ``reset_interval``, GaLore's ``rank``, ZClip's ``z_thresh``, ...)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer value: {name!r} (one of {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name](model, lr, weight_decay, dict(options or {}))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors in the optimizer state, including tensors one attribute deep (GaLore's projector).
    Distributed tensors count their local shard."""
    seen: set[int] = set()
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor) and id(value) not in seen:
            seen.add(id(value))  # the state keeps ``value`` alive, so its id stays unique
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()

    for state in optimizer.state.values():
        for value in state.values():
            add(value)
            for attribute in getattr(value, "__dict__", {}).values():
                add(attribute)
    return total
