"""Which kind of layer a parameter belongs to, and how deep it sits, from its qualified name."""

from __future__ import annotations

import re

LAYER_TYPES = ("embedding", "attention", "mlp", "norm", "head", "other")
# the transformer blocks' weights: where the paper's spikes matter (embedding and head rows of rare tokens
# spike whenever their token appears, in any run)
BLOCK_TYPES = ("attention", "mlp", "norm")

_PATTERNS = [
    ("norm", re.compile(r"(^|[._])(norm|ln|layernorm|rmsnorm)[^.]*(\.|$)|_norm\b|norm\d*\.", re.I)),
    ("embedding", re.compile(r"(^|\.)(embed[^.]*|wte|wpe|tok_emb[^.]*|pos_emb[^.]*)(\.|$)", re.I)),
    ("head", re.compile(r"(^|\.)(head|lm_head|output)(\.|$)", re.I)),
    ("attention", re.compile(r"(^|\.)(attn|attention|self_attn|q|k|v|o|[qkvo]_proj|qkv|c_attn)(\.|$)", re.I)),
    ("mlp", re.compile(r"(^|\.)(mlp|ffn|feed_forward|gate|up|down|w[123]|linear[12]|c_fc|fc\d?)(\.|$)", re.I)),
]
_DEPTH = re.compile(r"\.(\d+)\.")


def layer_type(name: str) -> str:
    """``embedding``, ``attention``, ``mlp``, ``norm``, ``head`` or ``other`` for a parameter name."""
    for kind, pattern in _PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def depth(name: str) -> int | None:
    """The block index in names like ``layers.3.mlp.up.weight`` (the first dotted integer), else None."""
    match = _DEPTH.search(f".{name}.")
    return int(match.group(1)) if match else None
