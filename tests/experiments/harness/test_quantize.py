"""Fake quantisation against values worked out by hand from the scheme (groups of 256, min–max INT weights,
symmetric INT activations with two outliers kept, the released code's 9-level "FP4" grid, E2M1), NaN handling,
the straight-through backward, and which modules get swapped."""

from __future__ import annotations

import pytest
import torch

from spamopt.experiments.harness.quantize import (GROUP, MX_BLOCK, QuantLinear, quantize_activation, quantize_model,
                                                  quantize_weight)
from spamopt.experiments.lm.config import CONFIGS, is_block_matrix
from spamopt.experiments.lm.model import Llama


def _group(*head: float, fill: float = 0.0, length: int = GROUP) -> torch.Tensor:
    values = torch.full((length,), fill, dtype=torch.float64)
    values[: len(head)] = torch.tensor(head, dtype=torch.float64)
    return values


def test_int4_weights_by_hand():
    """min −1, max 2: scale 3/15 = 0.2, zero point round(1/0.2) = 5; 0.33 → round(1.65) + 5 = 7 → 0.4;
    0.05 → round(0.25) + 5 = 5 → 0; 0.1 → round(0.5) = 0 (ties to even) → 0; the extremes are exact; at most
    16 levels."""
    w = _group(-1.0, 2.0, 0.33, 0.05, -0.51, fill=0.1)
    q = quantize_weight(w, "int4")
    assert q[:5].tolist() == pytest.approx([-1.0, 2.0, 0.4, 0.0, -0.6])
    assert q[5].item() == 0.0
    assert len(q.unique()) <= 16


def test_int8_weights_have_256_levels_and_groups_are_independent():
    torch.manual_seed(0)
    w = torch.randn(3 * GROUP + 44, dtype=torch.float64)  # three full groups and a tail of 44
    q = quantize_weight(w, "int8")
    for start in range(0, w.numel(), GROUP):
        part, got = w[start:start + GROUP], q[start:start + GROUP]
        scale = (part.max() - part.min()) / 255
        assert len(got.unique()) <= 256 and (got - part).abs().max() <= scale / 2 + 1e-12
    changed = w.clone()
    changed[GROUP:2 * GROUP] *= 100.0  # another group's range does not reach this one
    assert torch.equal(quantize_weight(changed, "int8")[:GROUP], q[:GROUP])
    assert torch.equal(quantize_weight(changed, "int8")[3 * GROUP:], q[3 * GROUP:])


def test_degenerate_weight_groups():
    """All zero: exactly zero. All equal (0.7): max − min = 0, so scale = 1e-5/15 and the zero point clamps to
    0: the scheme saturates at 15 · scale = 1e-5, as the released code does (weight groups of 256 straddle zero
    in practice; this is the formula's edge, pinned here so a change is seen)."""
    assert torch.equal(quantize_weight(torch.zeros(GROUP), "int4"), torch.zeros(GROUP))
    saturated = quantize_weight(torch.full((GROUP,), 0.7, dtype=torch.float64), "int4")
    assert torch.allclose(saturated, torch.full((GROUP,), 1e-5, dtype=torch.float64))


def test_int4_activations_keep_two_outliers_and_round_the_rest():
    """Outliers 100 and −50 pass exactly; the rest has max |x| = 1, so s = 7: 0.5 → round(3.5) = 4 → 4/7;
    −1 → −1; 0.3 → round(2.1) = 2 → 2/7; clamped to [−8, 7]."""
    x = _group(100.0, -50.0, 0.5, -1.0, 0.3, fill=0.0)
    q = quantize_activation(x, "int4")
    assert q[:5].tolist() == pytest.approx([100.0, -50.0, 4 / 7, -1.0, 2 / 7])
    assert len(q[2:].unique()) <= 16


def test_fp4_is_a_nine_level_grid_with_outliers_kept():
    """Rest max 2: grid {0, ±0.5, ±1, ±1.5, ±2}; 0.3 → round(0.6)/4·2 = 0.5, 0.2 → 0, −1.3 → −1.5."""
    x = _group(9.0, -7.0, 2.0, 0.3, 0.2, -1.3, fill=0.7)
    q = quantize_activation(x, "fp4")
    assert q[:6].tolist() == pytest.approx([9.0, -7.0, 2.0, 0.5, 0.0, -1.5])
    assert set(q[2:].tolist()) <= {0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 2.0, -2.0}
    assert torch.equal(quantize_weight(x, "fp4"), q)  # one quantiser for weights and activations


def test_e2m1_rounds_to_true_fp4_values():
    """max |x| = 6 sets the group's scale to 1: 2.4 → 2, −5.1 → −6, 0.2 → 0, 0.3 → 0.5, 3.4 → 3, and ties go to
    the even neighbour: 0.25 → 0, 0.75 → 1, 2.5 → 2."""
    pytest.importorskip("torchao")
    x = _group(6.0, 2.4, -5.1, 0.2, 0.3, 3.4, 0.25, 0.75, 2.5)
    q = quantize_weight(x, "e2m1")
    assert q[:9].tolist() == [6.0, 2.0, -6.0, 0.0, 0.5, 3.0, 0.0, 1.0, 2.0]
    assert torch.equal(quantize_activation(x, "e2m1"), q)


def test_mxfp4_blocks_of_32_share_a_power_of_two_scale():
    """The MX format: block 1 (max 6) has scale 2^(⌊log2 6⌋ − 2) = 1; block 2 (max 0.3) has 2^(−2 − 2) = 1/16,
    so 0.3 → 4.8/16 → 4/16 = 0.25, −0.1 → −1.5/16, 0.07 → 1/16. Blocks do not see each other."""
    pytest.importorskip("torchao")
    x = torch.zeros(2 * MX_BLOCK)
    x[:4] = torch.tensor([6.0, 0.25, 0.75, 2.5])
    x[MX_BLOCK:MX_BLOCK + 3] = torch.tensor([0.3, -0.1, 0.07])
    q = quantize_weight(x, "mxfp4")
    assert q[:4].tolist() == [6.0, 0.0, 1.0, 2.0]
    assert q[MX_BLOCK:MX_BLOCK + 3].tolist() == [0.25, -1.5 / 16, 1 / 16]


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp4", "e2m1", "mxfp4"])
def test_nan_makes_its_group_nan_and_leaves_the_others(scheme):
    """A NaN input never turns into a finite number: its group (its 32-block for MX) comes out NaN."""
    if scheme in ("e2m1", "mxfp4"):
        pytest.importorskip("torchao")
    group = MX_BLOCK if scheme == "mxfp4" else GROUP
    x = torch.randn(2 * GROUP)
    x[3] = float("nan")
    for quantize in (quantize_weight, quantize_activation):
        q = quantize(x, scheme)
        assert q[:group].isnan().all() and q[group:].isfinite().all()


def test_straight_through_backward_is_exactly_the_formula():
    """grad_X = grad_y · Q_w(W) and grad_W = grad_yᵀ · Q_a(X): the quantisers pass the gradient through."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(GROUP, 8).double()
    quantize_model(torch.nn.Sequential(layer), "int4", lambda name, module: True)
    x = torch.randn(3, GROUP, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    qw, qx = quantize_weight(layer.weight.detach(), "int4"), quantize_activation(x.detach(), "int4")
    torch.testing.assert_close(y, qx @ qw.T + layer.bias, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, grad_y @ qw, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, grad_y.T @ qx, rtol=0, atol=1e-12)


def test_only_the_block_linears_are_swapped_and_parameters_are_kept():
    model = Llama(CONFIGS["tiny"])
    params = dict(model.named_parameters())
    swapped = quantize_model(model, "int4", lambda name, m: is_block_matrix(f"{name}.weight", m.weight.shape))
    expected = {f"layers.{i}.{kind}" for i in range(CONFIGS["tiny"].layers)
                for kind in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")}
    assert set(swapped) == expected
    assert all(isinstance(m, QuantLinear) == (name in expected) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear))
    assert all(p is params[name] for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="Invalid quant value: 'int3'"):
        quantize_model(model, "int3", lambda *args: True)
