"""Where the compiled SPAM step's time goes on the CPU, beside torch's fused AdamW in the same process:

- ``kernel``: one 8M-element fp32 tensor, SPAM's compiled kernel called directly against fused AdamW's step;
- ``check``: ways to decide that every gradient of the LLaMA-60M shapes is finite (the skip check): the
  optimizer's ``aminmax`` per tensor, a compiled ``amax`` of |g|, a float32 sum (not exact alone: finite
  values can overflow), a float64 sum (exact);
- ``dispatch``: a whole step over 75 four-element tensors (Python, guards, launches; no arithmetic to speak
  of), compiled SPAM against fused AdamW.

Medians of ``--repeats`` calls, written to JSON. ::

    python benchmarks/compiled_breakdown.py --out results/compiled_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spamopt import SPAM
from spamopt.experiments.lm.config import CONFIGS
from spamopt.optim import compiled
from spamopt.optim.base import all_finite


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _kernel(repeats: int) -> dict[str, float]:
    n = 1 << 23
    gen = torch.Generator().manual_seed(0)
    p, g = torch.randn(n, generator=gen) * 0.02, torch.randn(n, generator=gen) * 1e-3
    m, v = torch.zeros(n), torch.rand(n, generator=gen) * 1e-6
    step_size = torch.tensor(-1e-3, dtype=torch.float64)
    # keep, θ, clip v = 0, factor, decay, 1 − β1, 1 − β2, ε
    scalars = torch.tensor([1, 5000, 0, 1, 1, 0.1, 0.001, 1e-6], dtype=torch.float64)
    kernel = compiled.spam_kernel(False)
    param = torch.nn.Parameter(p.clone())
    param.grad = g.clone()
    adamw = torch.optim.AdamW([param], lr=1e-3, fused=True)
    with compiled.limits():
        spam_ms = _median_ms(lambda: kernel(p, g, m, v, step_size, scalars), repeats)
    adamw_ms = _median_ms(adamw.step, repeats)
    return {"numel": n, "adamw_fused_ms": adamw_ms, "spam_kernel_ms": spam_ms, "ratio": spam_ms / adamw_ms}


def _check(repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) * 1e-3 for shape in CONFIGS["60m"].parameter_shapes().values()]
    flat = [g.view(-1) for g in grads]
    amax = torch.compile(lambda g: g.abs().amax(), dynamic=True, fullgraph=True)
    with compiled.limits():
        return {
            "aminmax_ms": _median_ms(lambda: all_finite(grads).item(), repeats),
            "compiled_amax_ms": _median_ms(lambda: torch.stack([amax(g) for g in flat]).isfinite().all().item(),
                                           repeats),
            "float32_sum_ms": _median_ms(lambda: torch.stack([g.sum() for g in grads]).isfinite().all().item(),
                                         repeats),
            "float64_sum_ms": _median_ms(
                lambda: torch.stack([g.sum(dtype=torch.float64) for g in grads]).isfinite().all().item(), repeats),
        }


def _dispatch(repeats: int) -> dict[str, float]:
    def step_ms(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]) -> float:
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(75)]
        for p in params:
            p.grad = torch.randn(4)
        return _median_ms(make(params).step, repeats)

    return {"tensors": 75,
            "spam_compiled_noskip_ms": step_ms(lambda ps: SPAM(ps, compiled=True, skip_nonfinite=False, clip_delay=0)),
            "adamw_fused_ms": step_ms(lambda ps: torch.optim.AdamW(ps, fused=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, default=Path("results/compiled_breakdown.json"))
    args = parser.parse_args()
    report = {"device": f"{platform.machine()} ({torch.get_num_threads()} threads)", "torch": torch.__version__,
              "kernel": _kernel(args.repeats), "check": _check(args.repeats), "dispatch": _dispatch(args.repeats)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
