"""The LLaMA architecture: RMSNorm, rotary embeddings, SwiGLU MLP, untied head, causal SDPA attention, and
optionally qk-layernorm (an RMSNorm over each head's queries and keys before the rotary embedding, which bounds
the attention logits: Wortsman et al. 2023's mitigation of attention-logit growth).
Parameter names match :meth:`LlamaConfig.parameter_shapes`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def largest_attention_logit(q: Tensor, k: Tensor) -> Tensor:
    """The largest logit softmax sees, ``max q·k / √d`` over batch, heads and causal pairs (key ≤ query)."""
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).amax()


class Attention(nn.Module):
    #: Keep the largest attention logit of each forward pass in :attr:`max_logit` (an extra q·kᵀ product; set
    #: by :meth:`Llama.record_attention_logits`, for spike forensics).
    record_max_logit: bool = False
    max_logit: Tensor | None = None

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h = config.hidden
        self.heads = config.heads
        self.q, self.k, self.v, self.o = (nn.Linear(h, h, bias=False) for _ in range(4))
        if config.qk_norm:
            self.q_norm = RMSNorm(h // config.heads, config.norm_eps)
            self.k_norm = RMSNorm(h // config.heads, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k = split(self.q(x)), split(self.k(x))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        if self.record_max_logit:
            self.max_logit = largest_attention_logit(q.detach(), k.detach())
        out = F.scaled_dot_product_attention(q, k, split(self.v(x)), is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, t, h))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        self.head = nn.Linear(config.hidden, config.vocab, bias=False)
        head_dim = config.hidden // config.heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(config.max_positions).float(), inv_freq)
        self.register_buffer("cos", torch.cat((angles, angles), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((angles, angles), -1).sin(), persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def record_attention_logits(self, enabled: bool = True) -> None:
        """Have every attention layer keep its largest logit of the last forward pass (see
        :meth:`attention_logits`)."""
        for layer in self.layers:
            layer.attn.record_max_logit = enabled

    def attention_logits(self) -> list[Tensor | None]:
        """Per layer, the largest attention logit of the last forward pass (None before one is recorded)."""
        return [layer.attn.max_logit for layer in self.layers]

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        cos, sin = self.cos[:t].to(self.embed.weight.dtype), self.sin[:t].to(self.embed.weight.dtype)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))
