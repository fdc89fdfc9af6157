r"""Simulated ("fake") low-bit training of linear layers, the scheme the SPAM and Stable-SPAM papers trained with.

A quantised linear layer computes ``y = Q_a(X) · Q_w(W)ᵀ + b``: weights and input activations are quantised
and de-quantised in the forward pass, while the master weights, gradients and optimizer state stay in full
precision. The backward is straight-through for both operands: ``grad_X = grad_y · Q_w(W)`` and
``grad_W = grad_yᵀ · Q_a(X)`` (``dQ/dx = 1``).

Every quantiser works on groups of ``GROUP = 256`` consecutive elements of the flattened tensor (a last,
shorter group takes the remainder). Schemes:

``int4`` / ``int8`` (b = 4 or 8)
    weights: asymmetric min–max with ``2^b`` levels, ``scale = max(max − min, 1e-5)/(2^b − 1)``,
    ``zero = clamp(−round(min/scale), 0, 2^b − 1)``, ``q = clamp(round(w/scale) + zero, 0, 2^b − 1)``,
    ``ŵ = (q − zero)·scale``. Activations: symmetric, the 2 entries of largest ``|x|`` of each group kept
    exactly, the rest scaled by ``s = (2^(b−1) − 1)/max(max|rest|, 1e-6)``, rounded, clamped to
    ``[−2^(b−1), 2^(b−1) − 1]`` and scaled back.
``fp4`` — the released Stable-SPAM code's "FP4", named for what it computes
    weights and activations alike: the top-2 ``|x|`` of each group kept exactly, the rest rounded to the
    uniform symmetric 9-level grid ``{0, ±1/4, ±1/2, ±3/4, ±1} · max|rest|``. (Its formula has an E1M2 form
    whose exponent term always clamps to one value, so the grid is uniform: it is not E2M1.)
``e2m1`` — true FP4 values on the papers' groups
    weights and activations: each group of 256 scaled by ``max|x|/6`` and rounded to the nearest E2M1 value
    ``{0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}`` (ties to even, by torchao's FP4 cast), no outliers kept.
``mxfp4`` — the OCP MX format, from torchao
    blocks of 32 elements sharing a power-of-two (E8M0) scale, E2M1 elements (torchao's ``MXTensor``).

``e2m1`` and ``mxfp4`` need torchao (``pip install 'spamopt[quant]'``; it runs on the CPU with the pinned
torch); they compute in float32.

Rounding is to nearest, ties to even (``torch.round``). A NaN in a group makes that group's output NaN (the
min–max and absolute-maximum reductions propagate it): never a silent finite number.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spamopt.extras import require

__all__ = ["GROUP", "MX_BLOCK", "SCHEMES", "QuantLinear", "quantize_weight", "quantize_activation", "quantize_model"]

GROUP = 256
SCHEMES = ("none", "int4", "int8", "fp4", "e2m1", "mxfp4")
MX_BLOCK = 32


def _grouped(x: Tensor, quantize_groups: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``quantize_groups`` (rows = groups) to the full groups of ``x`` and to its shorter tail."""
    flat = x.reshape(-1)
    full = flat.numel() // GROUP * GROUP
    parts = []
    if full:
        parts.append(quantize_groups(flat[:full].view(-1, GROUP)).reshape(-1))
    if full < flat.numel():
        parts.append(quantize_groups(flat[full:].view(1, -1)).reshape(-1))
    return torch.cat(parts).view_as(x) if parts else x.clone()


def _asymmetric(groups: Tensor, bits: int) -> Tensor:
    top = 2**bits - 1
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    scale = (high - low).clamp(min=1e-5) / top
    zero = torch.clamp(-torch.round(low / scale), 0, top)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, top)
    return (q - zero) * scale


def _outliers_kept(groups: Tensor, quantize_rest: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Keep the two largest ``|x|`` of each group exactly; ``quantize_rest(groups, max|rest|)`` does the rest."""
    keep = min(2, groups.shape[1])
    magnitude = groups.abs()
    outliers = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, magnitude.topk(keep, dim=1).indices, True)
    rest_max = magnitude.masked_fill(outliers, 0.0).amax(dim=1, keepdim=True)
    quantized = torch.where(outliers, groups, quantize_rest(groups, rest_max))
    return torch.where(magnitude.isnan().any(dim=1, keepdim=True), torch.nan, quantized)  # NaN stays visible


def _symmetric(groups: Tensor, rest_max: Tensor, bits: int) -> Tensor:
    top = 2 ** (bits - 1) - 1
    scale = top / rest_max.clamp(min=1e-6)
    return torch.clamp(torch.round(groups * scale), -top - 1, top) / scale


def _nine_levels(groups: Tensor, rest_max: Tensor) -> Tensor:
    scale = rest_max.clamp(min=1e-6)
    return torch.clamp(torch.round(groups / scale * 4.0), -4.0, 4.0) / 4.0 * scale


def _e2m1(groups: Tensor) -> Tensor:
    kernels = require("torchao.prototype.mx_formats.kernels", "quant", "torchao")
    scale = (groups.abs().amax(dim=1, keepdim=True) / 6.0).clamp(min=1e-12)  # NaN in a group: a NaN scale
    scaled = (groups / scale).float()
    return kernels.f4_unpacked_to_f32(kernels.f32_to_f4_unpacked(scaled)).to(groups.dtype) * scale


def _mxfp4(x: Tensor) -> Tensor:
    mx = require("torchao.prototype.mx_formats.mx_tensor", "quant", "torchao")
    flat = x.reshape(-1).float()
    padded = F.pad(flat, (0, -flat.numel() % MX_BLOCK))  # zeros do not change a block's maximum
    blocks = mx.MXTensor.to_mx(padded.view(-1, MX_BLOCK), torch.float4_e2m1fn_x2, MX_BLOCK)
    return blocks.dequantize(torch.float32).reshape(-1)[: flat.numel()].view_as(x).to(x.dtype)


def quantize_weight(w: Tensor, scheme: str) -> Tensor:
    """The de-quantised weight ``Q_w(w)`` (same shape and dtype)."""
    if scheme in ("int4", "int8"):
        return _grouped(w, lambda g: _asymmetric(g, int(scheme[3:])))
    return _quantize_shared(w, scheme)


def quantize_activation(x: Tensor, scheme: str) -> Tensor:
    """The de-quantised activation ``Q_a(x)`` (same shape and dtype)."""
    if scheme in ("int4", "int8"):
        return _grouped(x, lambda g: _outliers_kept(g, lambda gs, m: _symmetric(gs, m, int(scheme[3:]))))
    return _quantize_shared(x, scheme)


def _quantize_shared(x: Tensor, scheme: str) -> Tensor:
    if scheme == "fp4":
        return _grouped(x, lambda g: _outliers_kept(g, _nine_levels))
    if scheme == "e2m1":
        return _grouped(x, _e2m1)
    if scheme == "mxfp4":
        return _mxfp4(x)
    raise ValueError(f"Invalid scheme value: {scheme!r} (one of {', '.join(SCHEMES[1:])})")


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantised tensor. Backward: the incoming gradient unchanged (``dQ/dx = 1``)."""

    @staticmethod
    def forward(ctx, x: Tensor, quantize: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight and input are fake-quantised with ``scheme`` (module docstring); its
    parameters are the full-precision master weights, under the same names as a plain ``nn.Linear``'s."""

    scheme: str = "int4"

    def forward(self, x: Tensor) -> Tensor:
        qx = _StraightThrough.apply(x, lambda t: quantize_activation(t, self.scheme))
        qw = _StraightThrough.apply(self.weight, lambda t: quantize_weight(t, self.scheme))
        return F.linear(qx, qw, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scheme={self.scheme}"


def quantize_model(model: nn.Module, scheme: str, include: Callable[[str, nn.Linear], bool]) -> list[str]:
    """Turn, in place, every ``nn.Linear`` of ``model`` for which ``include(name, module)`` holds into a
    :class:`QuantLinear` of ``scheme`` (the same parameter objects, so optimizers and checkpoints are
    unaffected); returns the names of the swapped modules. ``scheme="none"`` swaps nothing."""
    if scheme not in SCHEMES:
        raise ValueError(f"Invalid quant value: {scheme!r} (one of {', '.join(SCHEMES)})")
    if scheme == "none":
        return []
    swapped = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and include(name, module):
            module.__class__ = QuantLinear
            module.scheme = scheme
            swapped.append(name)
    return swapped
