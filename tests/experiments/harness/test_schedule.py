"""The shared learning-rate schedule: linear warmup, then a cosine down to the floor at the last step."""

from __future__ import annotations

import math

import pytest

from spamopt.experiments.harness.schedule import lr_multiplier


def test_lr_schedule_is_linear_warmup_then_cosine_to_the_floor():
    values = [lr_multiplier(s, 10, 110, 0.1) for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0) and values[10] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
