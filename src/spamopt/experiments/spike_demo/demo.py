"""Watch gradient spikes while a tiny byte-level LLaMA learns the standard library's source, with AdamW and
with SPAM, and write a spike report for each. CPU, about a minute."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from spamopt import SPAM
from spamopt.spikes import SpikeMonitor
from spamopt.spikes.report import build_report

from ..lm.config import CONFIGS
from ..lm.data import random_windows, stdlib_bytes
from ..lm.model import Llama


def run(data: torch.Tensor, run_dir: Path, optimizer: str, steps: int = 300, lr: float = 3e-3,
        seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Llama(CONFIGS["tiny"])
    if optimizer == "spam":
        # Paper defaults scaled to a 300-step run: reset every 100 steps, 20-step warmup, 10-step clip delay.
        opt = SPAM(model.parameters(), lr=lr, reset_interval=100, warmup_steps=20, clip_delay=10)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    out = run_dir / optimizer
    with SpikeMonitor(model, out, optimizer=opt, flush_every=50) as monitor:
        for _ in range(steps):
            batch = random_windows(data, 16, 64, generator)
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            monitor.observe(loss=loss)
            opt.step()
    return build_report(out)


def main(run_dir: Path, steps: int) -> list[Path]:
    data = stdlib_bytes()
    return [run(data, run_dir, name, steps) for name in ("adamw", "spam")]
