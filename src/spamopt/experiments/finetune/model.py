"""The model being fine-tuned, from a local source only (nothing is downloaded): a run directory of our LLaMA
harness (``spamopt train``: its ``config.json``, ``checkpoint.pt`` and the BPE it trained), or a local
``transformers`` causal-LM directory (``AutoModelForCausalLM`` and ``AutoTokenizer``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from spamopt.extras import require

from ..harness.optimizers import ModelLayout

__all__ = ["CausalLM", "load_causal_lm"]


class CausalLM(nn.Module):
    """``forward(tokens) → logits`` over ``core``, whichever kind it is."""

    def __init__(self, core: nn.Module, huggingface: bool) -> None:
        super().__init__()
        self.core = core
        self.huggingface = huggingface

    def forward(self, tokens: Tensor) -> Tensor:
        return self.core(input_ids=tokens).logits if self.huggingface else self.core(tokens)


@dataclass
class Loaded:
    model: CausalLM
    encode: Callable[[str], list[int]]
    eos: int
    layout: ModelLayout
    description: str


def _load_harness(run_dir: Path) -> Loaded:
    from ..lm.config import CONFIGS, optimizer_layout
    from ..lm.data import EOS, prepare
    from ..lm.model import Llama
    from ..lm.train import TrainConfig

    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    if config.quant != "none":
        raise ValueError(f"Invalid base value: {str(run_dir)!r} (a fake-quantised run ({config.quant}) cannot be "
                         "fine-tuned here)")
    data = prepare(config.data_config(), config.cache_dir)  # the run's cached tokenizer
    model_config = replace(CONFIGS[config.model], vocab=data.vocab_size,
                           max_positions=max(config.seq_len, CONFIGS[config.model].max_positions))
    core = Llama(model_config)
    saved = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    core.load_state_dict(saved["model"])
    tokenizer = require("tokenizers", "lm").Tokenizer.from_file(str(data.tokenizer_path))
    layout = optimizer_layout(model_config)
    prefixed = ModelLayout(is_block_matrix=lambda name, shape: layout.is_block_matrix(name.removeprefix("core."),
                                                                                       shape),
                           hidden=layout.hidden, heads=layout.heads)
    return Loaded(CausalLM(core, huggingface=False), lambda text: tokenizer.encode(text).ids,
                  tokenizer.token_to_id(EOS), prefixed,
                  f"LLaMA-{config.model} pre-trained by spamopt for {config.steps} steps on {config.data}")


def _load_transformers(directory: Path) -> Loaded:
    transformers = require("transformers", "integrations")
    core = transformers.AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True,
                                                             torch_dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    settings = core.config

    def is_block_matrix(name: str, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and ".layers." in name and "embed" not in name

    layout = ModelLayout(is_block_matrix=is_block_matrix, hidden=settings.hidden_size,
                         heads=settings.num_attention_heads)
    return Loaded(CausalLM(core, huggingface=True), lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                  tokenizer.eos_token_id, layout, f"{settings.model_type} from {directory}")


def load_causal_lm(base: str) -> Loaded:
    """A harness run directory (it holds ``checkpoint.pt``) or a ``transformers`` model directory."""
    path = Path(base)
    if (path / "checkpoint.pt").exists() and (path / "config.json").exists():
        return _load_harness(path)
    if (path / "config.json").exists():
        return _load_transformers(path)
    raise ValueError(f"Invalid base value: {base!r} (a spamopt train run directory with checkpoint.pt, or a local "
                     "transformers model directory with config.json)")
