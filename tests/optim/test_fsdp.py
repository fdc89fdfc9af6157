"""SPAM's sparse momentum under FSDP2 (2 processes, gloo on the CPU) against one process, and
``torch.distributed.checkpoint`` checkpoints resharded 2 -> 1 and 1 -> 2.

The worker (``fsdp_worker.py``) gives every process the same batch, so FSDP2's gradient average is exact and
the comparisons are bit for bit: a mask drawn per shard instead of for the whole matrix, moments misaligned with
their coordinates, a checkpoint holding one rank's moments, or a resume that cuts the wrong part would all show.
Its matrices are split inside a 4,096-element sampling stratum, and masks are redrawn twice in the 10 steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from spamopt.optim import sparse

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORKER = str(Path(__file__).with_name("fsdp_worker.py"))


def _run(processes: int, *args: str) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [WORKER, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process and two, 10 steps each, both saving a sharded checkpoint after step 4; then each
    checkpoint resumed by the other number of processes; and two processes keeping the kept positions."""
    root = tmp_path_factory.mktemp("fsdp")
    _run(1, "--steps", "10", "--save-at", "4", "--save-dir", str(root / "one_ckpt"), "--out", str(root / "one.pt"))
    _run(2, "--steps", "10", "--save-at", "4", "--save-dir", str(root / "two_ckpt"), "--out", str(root / "two.pt"))
    _run(1, "--steps", "10", "--load", str(root / "two_ckpt"), "--out", str(root / "two_then_one.pt"))
    _run(2, "--steps", "10", "--load", str(root / "one_ckpt"), "--out", str(root / "one_then_two.pt"))
    _run(2, "--steps", "10", "--keep-positions", "--out", str(root / "two_keeping_positions.pt"))
    return root


def _assert_identical(expected: dict, actual: dict) -> None:
    assert expected["model"].keys() == actual["model"].keys()
    for name, value in expected["model"].items():
        assert torch.equal(value, actual["model"][name]), name
    assert expected["optim"]["state"].keys() == actual["optim"]["state"].keys()
    for name, state in expected["optim"]["state"].items():
        assert state.keys() == actual["optim"]["state"][name].keys(), name
        for key, value in state.items():
            assert torch.equal(value, actual["optim"]["state"][name][key]), (name, key)


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_sparse_momentum_under_fsdp2_equals_one_process(runs):
    """Two processes train exactly as one: the same weights, masks and (gathered) compact moments, bit for bit,
    although each process was seeded differently after building the model."""
    one = _load(runs / "one.pt")
    assert "mask_bits" in one["optim"]["state"]["0.weight"] and "mask_bits" not in one["optim"]["state"]["2.weight"]
    _assert_identical(one, _load(runs / "two.pt"))


def test_kept_positions_under_fsdp2_equal_one_process(runs):
    """Two processes with ``keep_positions=True`` (each keeps its rows' positions, found again after the redraws
    after steps 3 and 7 change how many kept coordinates each rank holds) train bit for bit as one process
    searching the bitmask every step."""
    _assert_identical(_load(runs / "one.pt"), _load(runs / "two_keeping_positions.pt"))


@pytest.mark.parametrize("resumed", ["two_then_one", "one_then_two"])
def test_distributed_checkpoints_reshard_exactly(runs, resumed):
    """A sharded checkpoint written by 2 processes resumes in 1, and one written by 1 resumes in 2; both end
    bit for bit where the uninterrupted run ends (weights, and every optimizer state entry)."""
    _assert_identical(_load(runs / "one.pt"), _load(runs / f"{resumed}.pt"))


@pytest.mark.parametrize("start,end", [(0, 7200), (0, 3600), (3600, 7200), (5, 4099), (4096, 4096), (3, 11)])
def test_a_range_of_the_mask(start, end):
    """``slice_bits`` and ``count_kept`` agree with cutting the unpacked mask (ranges not on byte boundaries,
    empty, and across a stratum)."""
    bits = sparse.draw_mask(7200, 0.3, seed=5, generation=2, device="cpu")
    whole = sparse.unpack_mask(bits, 7200)
    part = sparse.slice_bits(bits, start, end)
    assert torch.equal(sparse.unpack_mask(part, end - start), whole[start:end])
    assert sparse.count_kept(bits, start, end) == int(whole[start:end].sum())
