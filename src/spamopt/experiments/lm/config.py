"""LLaMA shapes: the SPAM paper's reference configs (60m–1b) and three CPU sizes (tiny, mini, small)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..harness.optimizers import ModelLayout


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32000
    max_positions: int = 1024
    norm_eps: float = 1e-6
    qk_norm: bool = False  # RMSNorm over each head's queries and keys (qk-layernorm); adds two head_dim weights

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of every parameter (untied embedding and head, RMSNorm weights)."""
        h, i = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {"embed.weight": (self.vocab, h)}
        for layer in range(self.layers):
            prefix = f"layers.{layer}."
            for name in ("q", "k", "v", "o"):
                shapes[f"{prefix}attn.{name}.weight"] = (h, h)
            if self.qk_norm:
                shapes[f"{prefix}attn.q_norm.weight"] = (h // self.heads,)
                shapes[f"{prefix}attn.k_norm.weight"] = (h // self.heads,)
            shapes[f"{prefix}mlp.gate.weight"] = (i, h)
            shapes[f"{prefix}mlp.up.weight"] = (i, h)
            shapes[f"{prefix}mlp.down.weight"] = (h, i)
            shapes[f"{prefix}attn_norm.weight"] = (h,)
            shapes[f"{prefix}mlp_norm.weight"] = (h,)
        shapes["norm.weight"] = (h,)
        shapes["head.weight"] = (self.vocab, h)
        return shapes


CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(hidden=64, intermediate=172, layers=2, heads=4, vocab=256, max_positions=256),
    "mini": LlamaConfig(hidden=128, intermediate=344, layers=2, heads=4, vocab=8192, max_positions=256),
    # the spike-regime search's CPU size: 9M parameters with an 8k vocabulary, 4.7M of them in the blocks
    "small": LlamaConfig(hidden=256, intermediate=688, layers=6, heads=4, vocab=8192, max_positions=256),
    "60m": LlamaConfig(hidden=512, intermediate=1376, layers=8, heads=8),
    "130m": LlamaConfig(hidden=768, intermediate=2048, layers=12, heads=12),
    "350m": LlamaConfig(hidden=1024, intermediate=2736, layers=24, heads=16),
    "1b": LlamaConfig(hidden=2048, intermediate=5461, layers=24, heads=32),
}


def is_block_matrix(name: str, shape: Sequence[int]) -> bool:
    """The attention and MLP weight matrices of a block: where the paper puts sparse momentum (and GaLore its
    projection); embeddings, head and norms stay dense."""
    return len(shape) == 2 and (".attn." in name or ".mlp." in name)


def optimizer_layout(config: LlamaConfig) -> ModelLayout:
    """The LLaMA as the optimizer registry sees it: block matrices, width, heads and Adam-mini's name patterns
    (Adam-mini's defaults would take ``mlp_norm`` for an MLP matrix and miss our q/k/v/o and head)."""
    return ModelLayout(
        is_block_matrix=is_block_matrix, hidden=config.hidden, heads=config.heads,
        adam_mini_names={"embd_names": {"embed"}, "output_names": {"head."}, "wqk_names": {"attn.q.", "attn.k."},
                         "wv_names": {"attn.v."}, "attn_proj_names": {"attn.o."},
                         "mlp_names": {"mlp.gate.", "mlp.up.", "mlp.down."}})
