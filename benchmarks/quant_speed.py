"""Cost of fake quantisation: training tokens/s of a LLaMA with its block linears fake-quantised, against the
same model unquantised, side by side in one process (forward, backward and an AdamW step on random tokens),
the schemes taking turns step by step.

    python benchmarks/quant_speed.py --model mini          # writes results/quant_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from spamopt.experiments.harness.quantize import SCHEMES, quantize_model
from spamopt.experiments.lm.config import CONFIGS, is_block_matrix
from spamopt.experiments.lm.model import Llama


class _Trainer:
    """One model of ``scheme`` with its AdamW, stepping on fixed random tokens."""

    def __init__(self, model_name: str, scheme: str, batch: int, seq_len: int) -> None:
        torch.manual_seed(0)
        config = replace(CONFIGS[model_name], max_positions=max(seq_len, CONFIGS[model_name].max_positions))
        self.model = Llama(config)
        quantize_model(self.model, scheme, lambda name, m: is_block_matrix(f"{name}.weight", m.weight.shape))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, config.vocab, (batch, seq_len + 1), generator=generator)

    def step(self) -> float:
        start = time.perf_counter()
        logits = self.model(self.tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), self.tokens[:, 1:].flatten()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def tokens_per_second(model_name: str, batch: int, seq_len: int, repeats: int) -> dict[str, float]:
    """Median tokens/s per scheme; the schemes take turns step by step, so background load on a shared
    machine falls on all of them alike."""
    trainers = {scheme: _Trainer(model_name, scheme, batch, seq_len) for scheme in SCHEMES}
    for trainer in trainers.values():  # warm-up
        trainer.step()
        trainer.step()
    times: dict[str, list[float]] = {scheme: [] for scheme in SCHEMES}
    for _ in range(repeats):
        for scheme, trainer in trainers.items():
            times[scheme].append(trainer.step())
    return {scheme: batch * seq_len / statistics.median(t) for scheme, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mini", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/quant_speed.json"))
    args = parser.parse_args()
    rows = tokens_per_second(args.model, args.batch, args.seq_len, args.repeats)
    report = {"model": args.model, "batch": args.batch, "seq_len": args.seq_len, "torch": torch.__version__,
              "device": f"{platform.machine()} CPU ({torch.get_num_threads()} threads)",
              "tokens_per_s": rows, "vs_unquantised": {s: v / rows["none"] for s, v in rows.items()}}
    for scheme, value in rows.items():
        print(f"{scheme:>6}: {value:10,.0f} tokens/s ({value / rows['none']:.2f}x unquantised)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
