"""A scaled-down Table 1 of the SPAM paper on one GPU: LLaMA-60M pre-trained over the Gutenberg shards (or any
source) with several optimizers, final validation perplexity per optimizer, in results JSON.

Each optimizer's run resumes from its checkpoint and finished runs are reused, so the comparison can be split
over several commands that each stay under a time limit (``--optimizers spam`` in one, ``adamw`` in the next):

    python benchmarks/pretrain_table1.py --data ../shared/data/gutenberg --optimizers adamw,adam-clip,spam

REPRODUCTION.md gives the command that adds the study's controls (LABEL=NAME entries with their options).

Paper setup it scales down (docs/algorithm.md and the paper): sequence length 256, cosine LR with warmup to 0.1x,
SPAM θ=5000, ΔT=500, N=150, D=20 (the default here: 1500 steps give three resets). The paper trains 10k steps
× 512 sequences on C4 with a T5 tokenizer; this uses 128 sequences and an 8k BPE trained on the source.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from spamopt.experiments.lm.compare import CompareConfig, compare
from spamopt.experiments.lm.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/gutenberg")
    parser.add_argument("--optimizers", default="adamw,adam-clip,spam",
                        help="names, or LABEL=NAME to run a name under its own options (the controls)")
    parser.add_argument("--optimizer-args", type=json.loads, default={},
                        help="JSON: name or label → constructor options (default: the paper's)")
    parser.add_argument("--model", default="60m")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-train-tokens", type=int, default=None)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=Path("results/table1"))
    parser.add_argument("--cache-dir", default="runs/cache")
    args = parser.parse_args()

    base = TrainConfig(model=args.model, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                       steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 10),
                       eval_every=max(1, args.steps // 5), eval_tokens=1 << 20, checkpoint_every=250,
                       cache_dir=args.cache_dir, max_train_tokens=args.max_train_tokens, log_every=25,
                       run_dir=str(args.out))
    names = args.optimizers
    start = time.perf_counter()
    report = compare(CompareConfig(optimizers=names, seeds=args.seeds, out_dir=str(args.out),
                                   optimizer_args=args.optimizer_args), base)
    results = json.loads((args.out / "results.json").read_text())
    results["benchmark"] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "wall_seconds_this_command": time.perf_counter() - start,
        "base_config": asdict(base),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrain_table1.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
