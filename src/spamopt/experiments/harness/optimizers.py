"""Optimizers by name, with the paper's parameter groups, for any family's model.

A family describes its model once (:class:`ModelLayout`: which parameters are the block matrices that sparse
momentum and GaLore apply to, the width, the heads, Adam-mini's name patterns); every builder reads that and
nothing else about the model. Families may add names with :func:`register_optimizer`.

Baselines come from their maintained packages (``torch.optim``, ``adam-mini``, ``galore-torch``, ``zclip``,
``lion-pytorch``), never rewritten here; a missing package raises an ``ImportError`` naming the extra that
installs it. Gradient clippers (global norm, ZClip) run between ``backward()`` and ``step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spamopt import SPAM, AdaClipGN, StableSPAM
from spamopt.optim.base import local
from spamopt.extras import require

from .checkpoint import register_state_object

__all__ = ["ModelLayout", "OptimizerSetup", "GradientClipper", "OPTIMIZERS", "build_optimizer",
           "register_optimizer", "state_bytes", "tensor_bytes"]


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


@dataclass(frozen=True)
class ModelLayout:
    """What the builders need to know of a family's model.

    Attributes:
        is_block_matrix: ``(parameter name, shape) -> bool``: the matrices that get sparse momentum
            (``spam-sparse``) and GaLore's projection; everything else stays dense.
        hidden: the model width (GaLore's default rank is ``hidden // 4``; Adam-mini's ``dim``).
        heads: attention heads (Adam-mini's ``n_heads``).
        adam_mini_names: Adam-mini's partition name patterns (its attributes ``embd_names``, ``output_names``,
            ``wqk_names``, ``wv_names``, ``attn_proj_names``, ``mlp_names``), its documented way to adapt to a
            model; left at Adam-mini's defaults when empty.
    """

    is_block_matrix: Callable[[str, tuple[int, ...]], bool]
    hidden: int
    heads: int
    adam_mini_names: dict[str, set[str]] = field(default_factory=dict)

    def split(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(block matrices, everything else), in ``named_parameters`` order."""
        matrices, others = [], []
        for name, param in model.named_parameters():
            (matrices if self.is_block_matrix(name, tuple(param.shape)) else others).append(param)
        return matrices, others


def _adam(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
          options: dict[str, Any]) -> OptimizerSetup:
    return OptimizerSetup(torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


def _adamw(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
           options: dict[str, Any]) -> OptimizerSetup:
    return OptimizerSetup(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


def _adam_clip(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
               options: dict[str, Any]) -> OptimizerSetup:
    max_norm = options.pop("max_norm", 1.0)
    return OptimizerSetup(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **options),
                          GlobalNormClipper(max_norm))


def _zclip(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
           options: dict[str, Any]) -> OptimizerSetup:
    clipper = ZClipClipper(**options)
    return OptimizerSetup(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay), clipper)


def _adafactor(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
               options: dict[str, Any]) -> OptimizerSetup:
    if not hasattr(torch.optim, "Adafactor"):
        raise ImportError(f"adafactor needs torch.optim.Adafactor (torch >= 2.5); this is torch {torch.__version__}")
    return OptimizerSetup(torch.optim.Adafactor(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


def _lion(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
          options: dict[str, Any]) -> OptimizerSetup:
    lion = require("lion_pytorch", "baselines", "lion-pytorch")
    return OptimizerSetup(lion.Lion(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


def _adam_mini(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
               options: dict[str, Any]) -> OptimizerSetup:
    adam_mini = require("adam_mini", "baselines", "adam-mini")
    options = {"dim": layout.hidden, "n_heads": layout.heads, "verbose": False, **options}
    optimizer = adam_mini.Adam_mini(model.named_parameters(), lr=lr, weight_decay=weight_decay, **options)
    for attribute, patterns in layout.adam_mini_names.items():  # Adam-mini partitions by name substrings
        setattr(optimizer, attribute, set(patterns))
    return OptimizerSetup(optimizer)


def _galore(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
            options: dict[str, Any]) -> OptimizerSetup:
    galore_torch = require("galore_torch", "galore", "galore-torch")
    matrices, others = layout.split(model)
    # The GaLore paper's ranks are a quarter of the hidden size at 60M, 350M and 1B.
    galore_group = {"rank": max(1, layout.hidden // 4), "update_proj_gap": 200, "scale": 0.25,
                    "proj_type": "std", **options}
    groups = [{"params": others}, {"params": matrices, **galore_group}]
    return OptimizerSetup(galore_torch.GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay))


def _spam(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
          options: dict[str, Any]) -> OptimizerSetup:
    return OptimizerSetup(SPAM(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


def _spam_sparse(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
                 options: dict[str, Any]) -> OptimizerSetup:
    density = options.pop("density", 0.25)
    matrices, others = layout.split(model)
    groups = [{"params": matrices, "density": density}, {"params": others}]
    return OptimizerSetup(SPAM(groups, lr=lr, weight_decay=weight_decay, **options))


def _stable_spam(model: nn.Module, layout: ModelLayout, lr: float, weight_decay: float,
                 options: dict[str, Any]) -> OptimizerSetup:
    # Every tensor, embeddings, norms and head included, as in the paper; options reach the constructor
    # ({"adaclip": "off", "adagn": false} is the paper's Adam + MoRet ablation, and so on).
    preset = options.pop("preset", None)
    if preset is not None:
        return OptimizerSetup(StableSPAM.from_preset(preset, model.parameters(), lr=lr, weight_decay=weight_decay,
                                                     **options))
    return OptimizerSetup(StableSPAM(model.parameters(), lr=lr, weight_decay=weight_decay, **options))


Builder = Callable[[nn.Module, ModelLayout, float, float, dict[str, Any]], OptimizerSetup]

WRAPPED = "+adagn"  # "<name>+adagn": a registered optimizer behind AdaClip and AdaGN (the paper's Table 3)
_WRAPPER_OPTIONS = ("gamma1", "gamma2", "gamma3", "eps_adagn", "adaclip")

OPTIMIZERS: dict[str, Builder] = {
    "adam": _adam,
    "adamw": _adamw,
    "adam-clip": _adam_clip,
    "adafactor": _adafactor,
    "lion": _lion,
    "adam-mini": _adam_mini,
    "galore": _galore,
    "zclip": _zclip,
    "spam": _spam,
    "spam-sparse": _spam_sparse,
    "stable-spam": _stable_spam,
}

# GaLore keeps its projector object in the optimizer state; checkpoints may rebuild it.
register_state_object("galore_torch.galore_projector.GaLoreProjector")


def register_optimizer(name: str, builder: Builder) -> None:
    """Add ``name`` to the registry (a family's own optimizer or variant); an existing name is an error."""
    if name in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer name: {name!r} is already registered")
    OPTIMIZERS[name] = builder


def build_optimizer(name: str, model: nn.Module, layout: ModelLayout, *, lr: float, weight_decay: float = 0.0,
                    options: dict[str, Any] | None = None) -> OptimizerSetup:
    """The optimizer ``name`` for ``model`` (unwrapped, or FSDP2-sharded) described by ``layout``; ``options``
    are passed to its constructor (SPAM's ``reset_interval``, GaLore's ``rank``, ZClip's ``z_thresh``, ...).
    ``"<name>+adagn"`` wraps optimizer ``name`` in :class:`spamopt.AdaClipGN`; the options ``gamma1``,
    ``gamma2``, ``gamma3``, ``adaclip`` and ``eps_adagn`` go to the wrapper, the rest to ``name``."""
    options = dict(options or {})
    base = name.removesuffix(WRAPPED)
    if base not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer value: {name!r} (one of {', '.join(OPTIMIZERS)}, or any of them "
                         f"followed by {WRAPPED})")
    if base == name:
        return OPTIMIZERS[name](model, layout, lr, weight_decay, options)
    wrapper = {key.removesuffix("_adagn"): options.pop(key) for key in _WRAPPER_OPTIONS if key in options}
    setup = OPTIMIZERS[base](model, layout, lr, weight_decay, options)
    return OptimizerSetup(AdaClipGN(setup.optimizer, **wrapper), setup.clipper)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s elements (a distributed tensor's local shard)."""
    shard = local(tensor)
    return shard.numel() * shard.element_size()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of storage the optimizer state keeps alive: every tensor in it and tensors one attribute deep
    (GaLore's projector), each storage counted once and whole, since a slice keeps its whole base alive
    (galore-torch's projector is a slice of a full SVD factor). Distributed tensors count their local shard.
    Equals what ``torch.distributed._tools.mem_tracker.MemTracker`` attributes to the optimizer state, plus what
    an optimizer holds beside it between steps (SPAM's ``kept_positions()``, with ``keep_positions=True``)."""
    seen: set[int] = set()
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = local(value).untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())  # the state keeps the storage alive, so its address stays unique
                total += storage.nbytes()

    for state in optimizer.state.values():
        for value in state.values():
            add(value)
            for attribute in getattr(value, "__dict__", {}).values():
                add(attribute)
    held_beside = getattr(optimizer, "kept_positions", None)
    for positions in (held_beside() if callable(held_beside) else {}).values():
        add(positions)
    return total
