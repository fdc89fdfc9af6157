"""Cost of SpikeMonitor.observe() per step, against the SPAM step it accompanies, on LLaMA-shaped gradients;
and of the forensics: the update records (the step with the monitor's hooks) and the attention logits (a
forward pass of the model with them recorded, batch 16 × 128).

    python benchmarks/monitor_overhead.py                 # CPU, LLaMA-60M shapes; writes results/monitor_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from spamopt import SPAM
from spamopt.experiments.lm.config import CONFIGS
from spamopt.experiments.lm.model import Llama
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
    # update forensics: the step with the monitor's hooks (a copy of the parameters before, update RMS and
    # moment norms after)
    with tempfile.TemporaryDirectory() as run_dir:
        with SpikeMonitor(named, run_dir, mode="tensor", optimizer=opt, updates=True, flush_every=10):
            results["spam_step_with_update_forensics_ms"] = _median_ms(opt.step, args.repeats, args.device)
    results["update_forensics_vs_spam_step"] = (results["spam_step_with_update_forensics_ms"]
                                                / results["spam_step_ms"] - 1)
    # attention-logit forensics: a forward pass of the model at a CPU training batch, with and without
    model = Llama(replace(CONFIGS[args.model], max_positions=128)).to(args.device)
    tokens = torch.randint(0, CONFIGS[args.model].vocab, (16, 128), generator=gen).to(args.device)
    with torch.no_grad():
        results["forward_ms"] = _median_ms(lambda: model(tokens), args.repeats, args.device)
        model.record_attention_logits(True)
        results["forward_with_attention_logits_ms"] = _median_ms(lambda: model(tokens), args.repeats, args.device)
    results["attention_logits_vs_forward"] = results["forward_with_attention_logits_ms"] / results["forward_ms"] - 1
    report = {"device": args.device, "torch": torch.__version__, "model": args.model,
              "parameters": sum(p.numel() for _, p in named), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
