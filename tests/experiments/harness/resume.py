"""The kill-and-resume guarantee, as a helper each family's tests call on its own run.

A family's test trains one run uninterrupted, then calls :func:`kill_and_resume` with the command line of the
same run: the process is killed with SIGKILL once ``reached()`` says it is mid-run (possibly while writing a
checkpoint), ``resume()`` continues it from its last checkpoint, and the test compares the two runs' outputs
with :func:`assert_same_tensors` / :func:`assert_same_checkpoint`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["kill_and_resume", "assert_same_tensors", "assert_same_checkpoint"]


def kill_and_resume(command: list[str], *, reached: Callable[[], bool], resume: Callable[[], Any],
                    timeout: float = 120.0) -> Any:
    """Run ``command``, SIGKILL it as soon as ``reached()`` is true (it must still be running then), and return
    ``resume()``. The child sees this interpreter's ``sys.path``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not reached():
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()[-2000:]
    assert reached(), f"the run did not reach the kill point within {timeout} s"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return resume()


def assert_same_tensors(expected: Any, got: Any, where: str = "") -> None:
    """Nested dicts, lists and tuples hold bit-identical tensors and equal other values (NaN equals NaN)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and expected.dtype == got.dtype, where
        assert torch.equal(expected, got) or torch.equal(expected.isnan(), got.isnan()) and torch.equal(
            expected.nan_to_num(), got.nan_to_num()), where
    elif isinstance(expected, dict):
        assert set(expected) == set(got), (where, set(expected) ^ set(got))
        for key, value in expected.items():
            assert_same_tensors(value, got[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), where
        for index, (a, b) in enumerate(zip(expected, got)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert expected == got, (where, expected, got)


def assert_same_checkpoint(expected: Path, got: Path, keys: tuple[str, ...] = ("model", "optimizer")) -> None:
    """The entries ``keys`` of two checkpoints (``torch.load(weights_only=True)``) are bit-identical."""
    a, b = (torch.load(path, weights_only=True) for path in (expected, got))
    for key in keys:
        assert_same_tensors(a[key], b[key], key)
