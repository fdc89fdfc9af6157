"""benchmarks/step_speed.py's interleaved order, which BENCHMARKS.md's CPU ratios come from: every row is timed
in every round after the warm-up, and a row whose step edits the gradients in place (pytorch-optimizer's SPAM)
has them restored, so that the rows after it step on the same gradients as the rows before it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def step_speed():
    spec = importlib.util.spec_from_file_location("step_speed", ROOT / "benchmarks" / "step_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Zeroing:
    """Steps by zeroing every gradient in place."""

    def __init__(self, grads):
        self.grads, self.state = grads, {}

    def step(self):
        for g in self.grads:
            g.zero_()


class _Recording:
    """Steps by recording the sum of the gradients it is given."""

    def __init__(self, grads):
        self.grads, self.state, self.seen = grads, {}, []

    def step(self):
        self.seen.append(sum(float(g.sum()) for g in self.grads))


def test_interleaved_rows_see_the_same_gradients_and_are_all_timed(step_speed):
    named = step_speed._params("tiny", "cpu")
    snapshot = [(p.detach().clone(), p.grad.clone()) for _, p in named]
    grads = [p.grad for _, p in named]
    total = sum(float(g.sum()) for g in grads)
    before, after = _Recording(grads), _Recording(grads)
    editor = next(iter(step_speed.EDITS_GRADIENTS))
    candidates = {"before": lambda: before, editor: lambda: _Zeroing(grads), "after": lambda: after}

    rows = step_speed._interleaved(named, snapshot, candidates, "cpu", repeats=3, warmup=2)

    assert list(rows) == ["before", editor, "after"]
    assert all(row["ms_per_step"] > 0 and row["first_step_s"] > 0 for row in rows.values())
    # the first (timed) step and 2 + 3 rounds: every one on the original gradients, before and after the editor
    assert len(before.seen) == len(after.seen) == 6
    assert before.seen == after.seen == pytest.approx([total] * 6)
    assert total != 0


def test_every_row_times_the_implementation_its_name_says(step_speed):
    """Rows made in one process from shared group dicts once took the first sparse row's flags (torch.optim
    writes its defaults into the dicts it is given), so "compiled" and "fused" sparse rows timed foreach. Made
    in the benchmark's order, every SPAM and Stable-SPAM row's groups use the implementation its name says."""
    named = step_speed._params("tiny", "cpu")
    made = {name: make() for name, make in step_speed._candidates(named, "cpu", [8]).items()}
    checked = 0
    for name, opt in made.items():
        if not name.startswith(("spam", "stable_spam")):
            continue
        expected = next(kind for kind in ("compiled", "fused", "foreach", "forloop") if kind in name)
        assert {opt._implementation(g, g["params"]) for g in opt.param_groups} == {expected}, name
        checked += 1
    assert checked >= 7
    assert made["spam_sparse25_compiled_positions"].param_groups[0]["keep_positions"] is True
    torch_kernels = [name for name in made if "torch_kernels" in name or name.endswith("_aminmax")]
    assert all(isinstance(made[name], step_speed._TorchKernelsOnly) for name in torch_kernels)
    assert all(not isinstance(opt, step_speed._TorchKernelsOnly) for name, opt in made.items()
               if name not in torch_kernels)


def test_the_torch_kernel_rows_step_without_the_native_loops(step_speed, monkeypatch):
    """A ``*_torch_kernels`` row's step runs with the native loops off (calling them would fail here), and the
    switch is restored after it: the plain compiled row then uses them."""
    from spamopt import SPAM
    from spamopt.optim import native

    calls = []
    monkeypatch.setattr(native, "spam_update", lambda *args, **kwargs: calls.append(1))
    monkeypatch.delenv("SPAMOPT_NATIVE", raising=False)
    param = torch.nn.Parameter(torch.randn(16))
    param.grad = torch.randn(16)
    step_speed._TorchKernelsOnly(SPAM([param], compiled=True)).step()
    assert calls == [] and "SPAMOPT_NATIVE" not in os.environ
    if native.available():
        SPAM([param], compiled=True).step()
        assert calls == [1]
