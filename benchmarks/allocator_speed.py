"""CPU step times with glibc's default allocator against freed memory kept in the process
(:func:`spamopt.experiments.harness.allocator.keep_freed_memory`, what every ``spamopt`` command does), side by
side in one run.

Each round runs one child process per setting (``SPAMOPT_ALLOCATOR=system``, then ``keep``), alternating, so
that a change in the machine's load touches both; a child measures

- whole training steps of the harness's LLaMA (16 × 128 tokens, SPAM with the harness's defaults: forward,
  loss, backward, step), median over steps 3-12, for ``--models``;
- optimizer steps alone at LLaMA-60M shapes (``--shapes``), interleaved, median of ``--repeats``.

Reports the median over rounds and the ratio default / kept; writes JSON. ::

    python benchmarks/allocator_speed.py --threads 2 --rounds 2 --out results/allocator_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

CHOICES = ("system", "keep")


def _train_step_ms(model_name: str, steps: int = 12) -> float:
    from spamopt import SPAM
    from spamopt.experiments.lm.config import CONFIGS
    from spamopt.experiments.lm.model import Llama

    config = CONFIGS[model_name]
    torch.manual_seed(0)
    model = Llama(config)
    opt = SPAM(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        batch = torch.randint(0, config.vocab, (16, 129), generator=generator)
        start = time.perf_counter()
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


def _optimizer_steps_ms(shapes: str, repeats: int) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).parent))
    from side_by_side import interleaved_medians, llama_parameters

    from spamopt import SPAM, StableSPAM
    from spamopt.experiments.lm.config import is_block_matrix

    named = llama_parameters(shapes)
    params = [p for _, p in named]
    sparse_groups = [{"params": [p for n, p in named if is_block_matrix(n, p.shape)], "density": 0.25},
                     {"params": [p for n, p in named if not is_block_matrix(n, p.shape)]}]
    optimizers = {
        "adamw_fused": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True),
        "spam_forloop": SPAM(params, lr=1e-3, foreach=False, clip_delay=0),
        "spam_compiled": SPAM(params, lr=1e-3, compiled=True, clip_delay=0),
        "spam_sparse25_compiled": SPAM(sparse_groups, lr=1e-3, compiled=True, clip_delay=0),
        "stable_spam_compiled": StableSPAM(params, lr=1e-3, compiled=True),
    }
    return interleaved_medians(optimizers, lambda name: nullcontext(), repeats)


def _child(args: argparse.Namespace) -> None:
    from spamopt.experiments.harness.allocator import keep_freed_memory

    torch.set_num_threads(args.threads)
    row = {"kept": keep_freed_memory()}
    for model in args.models:
        row[f"train_{model}"] = _train_step_ms(model)
    if args.shapes:
        row.update({f"{args.shapes}_{name}": ms for name, ms in _optimizer_steps_ms(args.shapes, args.repeats).items()})
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=["mini", "small"])
    parser.add_argument("--shapes", default="60m", help="LLaMA shapes of the optimizer rows ('': none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/allocator_speed.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    runs: dict[str, list[dict]] = {choice: [] for choice in CHOICES}
    command = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--shapes", args.shapes,
               "--repeats", str(args.repeats), "--models", *args.models]
    for _ in range(args.rounds):
        for choice in CHOICES:
            out = subprocess.run(command, env={**os.environ, "SPAMOPT_ALLOCATOR": choice}, capture_output=True,
                                 text=True, check=True)
            runs[choice].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = [key for key in runs["keep"][0] if key != "kept"]
    median = {choice: {key: statistics.median(run[key] for run in runs[choice]) for key in rows} for choice in CHOICES}
    report = {"meta": {"device": f"{platform.machine()} ({args.threads} threads)", "torch": torch.__version__,
                       "glibc": platform.libc_ver()[1], "rounds": args.rounds,
                       "kept_took_effect": all(run["kept"] for run in runs["keep"])},
              "rows": {key: {"system_ms": median["system"][key], "kept_ms": median["keep"][key],
                             "speedup": median["system"][key] / median["keep"][key]} for key in rows}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| row | glibc default ms | memory kept ms | speed-up |\n| --- | ---: | ---: | ---: |")
    for key, row in report["rows"].items():
        print(f"| {key} | {row['system_ms']:.1f} | {row['kept_ms']:.1f} | {row['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
