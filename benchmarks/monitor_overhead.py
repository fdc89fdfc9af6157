"""Cost of SpikeMonitor.observe() per step, against the SPAM step it accompanies, on LLaMA-shaped gradients.

    python benchmarks/monitor_overhead.py                 # CPU, LLaMA-60M shapes; writes results/monitor_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spamopt import SPAM
from spamopt.experiments.lm.config import CONFIGS
from spamopt.spikes import SpikeMonitor


def _median_ms(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="60m", choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/monitor_overhead.json"))
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    named = []
    for name, shape in CONFIGS[args.model].parameter_shapes().items():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02).to(args.device))
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3).to(args.device)
        named.append((name, p))
    opt = SPAM([p for _, p in named], foreach=True, clip_delay=0)
    opt.step()
    results = {"spam_step_ms": _median_ms(opt.step, args.repeats, args.device)}
    for mode in ("tensor", "element"):
        with tempfile.TemporaryDirectory() as run_dir:
            with SpikeMonitor(named, run_dir, mode=mode, flush_every=10) as monitor:
                monitor.observe()
                results[f"observe_{mode}_ms"] = _median_ms(monitor.observe, args.repeats, args.device)
        results[f"observe_{mode}_vs_spam_step"] = results[f"observe_{mode}_ms"] / results["spam_step_ms"]
    report = {"device": args.device, "torch": torch.__version__, "model": args.model,
              "parameters": sum(p.numel() for _, p in named), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
