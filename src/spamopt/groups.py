"""Parameter groups for SPAM and Stable-SPAM from any ``torch.nn.Module`` (a ``transformers`` model, a PEFT
model, a plain module): the boilerplate every training script repeats, written once.

:func:`param_groups` sorts the *trainable* parameters (``requires_grad``; a PEFT model's frozen base gets no
group and so no optimizer state) into

* block matrices: the weights of ``nn.Linear`` layers (and of ``transformers``' ``Conv1D``, GPT-2's linear
  layer), weight decay applied, and ``density`` (sparse momentum) when it is below 1, as the paper applies it
  to attention and MLP matrices;
* other matrices and tensors of 2+ dimensions: embeddings, the output head (whose weight is often the
  embedding's, tied) and task heads (modules named ``classifier``, ``score``, ``pooler``, ``qa_outputs`` or
  ``cls``, as ``transformers`` names them), decayed, always dense;
* vectors and scalars (biases, norm weights): no weight decay, dense.

Empty groups are left out. The result goes straight to the constructor:
``SPAM(param_groups(model, weight_decay=0.1, density=0.25), lr=1e-3)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups"]

# transformers' task heads and BERT's pooler: not the model's blocks, so never sparse.
TASK_HEADS = frozenset({"classifier", "score", "pooler", "qa_outputs", "cls"})


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or ``transformers``' ``Conv1D`` (GPT-2's linear layer, weight stored transposed)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _output_head(model: nn.Module) -> nn.Module | None:
    """The output projection of a ``transformers`` model (``get_output_embeddings``), if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def param_groups(model: nn.Module, *, weight_decay: float = 0.0, density: float = 1.0) -> list[dict[str, Any]]:
    """Decay / no-decay and sparse / dense groups of ``model``'s trainable parameters (module docstring).

    Args:
        model: any module; parameters shared by several modules are listed once.
        weight_decay: decoupled weight decay of the matrix groups (vectors get 0).
        density: fraction of each block matrix's coordinates with moments, in ``(0, 1]`` (SPAM only: Stable-SPAM
            has no sparse momentum, so pass 1).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"Invalid density value: {density!r} (must be in (0, 1])")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (must be >= 0)")
    head = _output_head(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    blocks: set[int] = set()
    for name, module in model.named_modules():
        in_head = module is head or not TASK_HEADS.isdisjoint(name.split("."))
        if _is_linear(module) and not in_head and id(module.weight) not in embeddings:
            blocks.add(id(module.weight))
    sparse, matrices, vectors = [], [], []
    for param in model.parameters():  # each shared tensor once
        if not param.requires_grad:
            continue
        if id(param) in blocks:
            sparse.append(param)
        elif param.dim() >= 2:
            matrices.append(param)
        else:
            vectors.append(param)
    if density == 1.0:
        matrices, sparse = sparse + matrices, []
    groups = [{"params": sparse, "weight_decay": weight_decay, "density": density},
              {"params": matrices, "weight_decay": weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
