"""One training run of a small model with SPAM, sparse and dense groups, under FSDP2 when started by torchrun
with more than one process (gloo, CPU), in one process otherwise. Used by ``test_fsdp.py``.

Every process trains on the same batch, so FSDP2's gradient average is of identical values and exact: any
difference from one process is the optimizer's doing. Optionally saves a sharded ``torch.distributed.checkpoint``
after ``--save-at`` steps and starts from ``--load`` (saved with any number of processes); writes the full
weights and the full optimizer state (``full_state_dict``) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_state_dict)

from spamopt import SPAM

# Matrices of 7,200 and 2,600 elements: split by rows over 2 ranks at 3,600 and 1,300, inside a 4,096-element
# sampling stratum. reset_interval 4: masks are redrawn after steps 3 and 7.
SETTINGS = dict(lr=1e-2, reset_interval=4, warmup_steps=2, clip_delay=1, threshold=50.0)


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(72, 100), torch.nn.Tanh(), torch.nn.Linear(100, 26),
                               torch.nn.Tanh(), torch.nn.Linear(26, 100))


def build_optimizer(model: torch.nn.Module, density: float, foreach: bool, keep_positions: bool = False) -> SPAM:
    first, _, middle, _, last = model
    sparse = [first.weight, last.weight]
    dense = [middle.weight, first.bias, middle.bias, last.bias]
    return SPAM([{"params": sparse, "density": density}, {"params": dense}], foreach=foreach,
                keep_positions=keep_positions, **SETTINGS)


def train_step(model: torch.nn.Module, optimizer: SPAM, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 72, generator=generator)
    target = torch.randn(32, 100, generator=generator)
    if step == 5:  # one spike, so that clipping acts
        x[0, 0] = 400.0
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), target).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--foreach", action="store_true")
    parser.add_argument("--keep-positions", action="store_true")
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--save-dir")
    parser.add_argument("--load")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
    model = build_model()
    # Each process seeded differently from here on: the masks must still agree (the first rank's seed).
    torch.manual_seed(int(os.environ.get("RANK", "0")))
    if world > 1:
        for index in (0, 2, 4):
            fully_shard(model[index])
        fully_shard(model)
    optimizer = build_optimizer(model, args.density, args.foreach, args.keep_positions)
    start = 0
    if args.load:
        template = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(template, checkpoint_id=args.load)
        set_state_dict(model, optimizer, model_state_dict=template["model"], optim_state_dict=template["optim"])
        start = int(Path(args.load, "step").read_text())
    for step in range(start + 1, args.steps + 1):
        train_step(model, optimizer, step)
        if step == args.save_at:
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=args.save_dir)
            if not dist.is_initialized() or dist.get_rank() == 0:
                Path(args.save_dir, "step").write_text(str(step))
    full = StateDictOptions(full_state_dict=True)
    weights = get_model_state_dict(model, options=full)
    state = get_optimizer_state_dict(model, optimizer, options=full)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"model": weights, "optim": state}, args.out)
    if dist.is_initialized():
        dist.barrier()  # every rank's work is done and written
        # Leave without the interpreter's teardown: with gloo and DCP's threads it sometimes aborts ("terminate
        # called without an active exception") after everything is saved, which torchrun reports as a failure.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
