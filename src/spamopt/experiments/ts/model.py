"""PatchTST from Hugging Face ``transformers`` (``PatchTSTForPrediction``), configured as the PatchTST paper
configures it for ETT, and its layout for the optimizer registry."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spamopt.extras import require

from ..harness.optimizers import ModelLayout

__all__ = ["PatchTSTShape", "build_patchtst", "patchtst_layout"]


@dataclass(frozen=True)
class PatchTSTShape:
    """PatchTST/42's ETTh1 settings (Nie et al., 2023): patches of 16 with stride 8, a 3-layer post-norm
    BatchNorm encoder of width 16 with 4 heads and a 128-wide feed-forward, dropout 0.3, learnable positions,
    PyTorch's default initialisation, a flatten-and-project head; channel independence and per-instance
    standardisation (RevIN without its affine part) as in the paper. What transformers' PatchTST cannot
    express: PatchTST's residual attention (attention scores carried from layer to layer) and its padding of
    the series end by one stride (41 patches of a 336 look-back instead of 42)."""

    patch_length: int = 16
    patch_stride: int = 8
    d_model: int = 16
    heads: int = 4
    layers: int = 3
    ffn: int = 128
    dropout: float = 0.3


def build_patchtst(channels: int, lookback: int, horizon: int, shape: PatchTSTShape) -> nn.Module:
    transformers = require("transformers", "ts")
    config = transformers.PatchTSTConfig(
        num_input_channels=channels, context_length=lookback, prediction_length=horizon,
        patch_length=shape.patch_length, patch_stride=shape.patch_stride, d_model=shape.d_model,
        num_attention_heads=shape.heads, num_hidden_layers=shape.layers, ffn_dim=shape.ffn,
        # PatchTST's one dropout acts after the positional encoding, inside the feed-forward and on both
        # residual branches; transformers names those three places (its `dropout` field is read nowhere).
        # PatchTST's attention dropout and its flatten head's are 0.
        positional_dropout=shape.dropout, ff_dropout=shape.dropout, path_dropout=shape.dropout,
        attention_dropout=0.0, head_dropout=0.0, pooling_type=None,  # PatchTST's flatten head
        scaling="std",  # per-instance standardisation (RevIN, affine=False as in PatchTST's ETT scripts)
        pre_norm=False, norm_type="batchnorm",  # PatchTST's encoder: post-norm, BatchNorm
        positional_encoding_type="random",  # learnable positions (initialised below as PatchTST's)
        share_embedding=True, channel_attention=False, do_mask_input=False, loss="mse")
    model = transformers.PatchTSTForPrediction(config)
    _initialise_as_patchtst(model)
    return model


def _initialise_as_patchtst(model: nn.Module) -> None:
    """PatchTST never re-initialises its layers, so they keep PyTorch's defaults (transformers draws linear
    weights from N(0, 0.02)), and its learnable positions start uniform in ±0.02."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
            position = getattr(module, "position_enc", None)
            if isinstance(position, nn.Parameter):
                position.uniform_(-0.02, 0.02)


def _encoder_matrix(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and ".encoder.layers." in name


def patchtst_layout(shape: PatchTSTShape) -> ModelLayout:
    """The attention and feed-forward matrices of the encoder are the block matrices (sparse momentum,
    GaLore); patch embedding, norms and head stay dense."""
    return ModelLayout(is_block_matrix=_encoder_matrix, hidden=shape.d_model, heads=shape.heads)
