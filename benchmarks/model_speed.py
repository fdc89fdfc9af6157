"""Training throughput of the LLaMA harness's model, eager against ``torch.compile``, side by side.

For each size, three modes train the same model (same initial weights, same random batches, fused AdamW) for
``--steps`` steps in this one process: eager, each block compiled (what ``spamopt train --compile`` does) and
the whole model compiled. The table gives tokens per second over the steps after ``--warmup`` (median of
per-step times), the ratios to eager, and the compile time (a mode's first steps minus eager's). Writes JSON.

    python benchmarks/model_speed.py                         # tiny, mini and small on this CPU
    python benchmarks/model_speed.py --models mini --steps 40 --batch 16 --seq 128
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

from spamopt.experiments.lm.config import CONFIGS, LlamaConfig
from spamopt.experiments.lm.model import Llama

MODES = ("eager", "blocks", "whole")


def _timed_steps(config: LlamaConfig, mode: str, batches: list[torch.Tensor]) -> list[float]:
    torch.manual_seed(0)
    model = Llama(config)
    if mode == "blocks":
        for block in model.layers:
            block.compile()
    elif mode == "whole":
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    times = []
    for batch in batches:
        start = time.perf_counter()
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def measure(name: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    config = replace(CONFIGS[name], max_positions=max(seq, CONFIGS[name].max_positions))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab, (batch, seq + 1), generator=gen) for _ in range(steps)]
    tokens = batch * seq
    row = {"model": name, "parameters": sum(p.numel() for p in Llama(config).parameters()),
           "tokens_per_step": tokens}
    first = {}
    for mode in MODES:
        times = _timed_steps(config, mode, batches)
        row[f"{mode}_tokens_per_s"] = tokens / statistics.median(times[warmup:])
        first[mode] = sum(times[:warmup])
    for mode in MODES[1:]:
        row[f"{mode}_speedup"] = row[f"{mode}_tokens_per_s"] / row["eager_tokens_per_s"]
        row[f"{mode}_compile_s"] = first[mode] - first["eager"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "mini", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out (they compile)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("results/model_speed.json"))
    args = parser.parse_args()
    device = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    report = {"device": device, "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "runs": []}
    print(f"{'model':<8}{'params':>10}{'eager tok/s':>13}{'blocks tok/s':>14}{'(x, compile s)':>16}"
          f"{'whole tok/s':>13}{'(x, compile s)':>16}")
    for name in args.models:
        row = measure(name, args.steps, args.warmup, args.batch, args.seq)
        report["runs"].append(row)
        print(f"{name:<8}{row['parameters'] / 1e6:>9.1f}M{row['eager_tokens_per_s']:>13,.0f}"
              + "".join(f"{row[f'{m}_tokens_per_s']:>14,.0f}{row[f'{m}_speedup']:>9.2f}x{row[f'{m}_compile_s']:>6.1f}s"
                        for m in MODES[1:]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
