"""Ways to decide on the device whether every gradient value is finite (SPAM's non-finite skip), on the CPU:
their time on one tensor and whether they are right about ±inf, NaN and huge finite values.

* ``aminmax``: the smallest and largest value in one pass (what the CPU path uses): NaN or ±inf shows in one.
* ``zero_sum``: ``sum(g · 0)``, 0 for finite g and NaN otherwise (a sum that cannot overflow), eager.
* ``zero_sum_compiled``: the same through ``torch.compile``, which folds ``g · 0`` to 0 and so is never NaN.
* ``zero_input_sum_compiled``: ``sum(g · z)`` through ``torch.compile`` with ``z`` a zero passed in as a
  tensor, which the compiler cannot fold.
* ``isfinite_all``: ``torch.isfinite(g).all()``, a boolean temporary of the tensor's size.

Interleaved repeats in one process, median of 7; writes ``results/finite_check.json``.

    python benchmarks/finite_check.py --numel 8000000 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def aminmax(g: torch.Tensor) -> torch.Tensor:
    return torch.stack(torch.aminmax(g)).isfinite().all()


def zero_sum(g: torch.Tensor) -> torch.Tensor:
    return torch.mul(g, 0).sum().isfinite()


_folded = torch.compile(lambda g: (g * 0).sum())


def zero_sum_compiled(g: torch.Tensor) -> torch.Tensor:
    return _folded(g).isfinite()


_unfolded = torch.compile(lambda g, zero: (g * zero).sum())
_ZERO = torch.zeros(())


def zero_input_sum_compiled(g: torch.Tensor) -> torch.Tensor:
    return _unfolded(g, _ZERO).isfinite()


def isfinite_all(g: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(g).all()


CHECKS = [aminmax, zero_sum, zero_sum_compiled, zero_input_sum_compiled, isfinite_all]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=8_000_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/finite_check.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    cases = {"finite": g, "huge finite": g.clone().index_fill_(0, torch.tensor([5, 6]), 3e38)}
    for name, value in (("inf", float("inf")), ("nan", float("nan"))):
        cases[name] = g.clone().index_fill_(0, torch.tensor([5]), value)
    times: dict[str, list[float]] = {check.__name__: [] for check in CHECKS}
    for check in CHECKS:
        check(g)  # warm up (compiles once)
    for _ in range(7):
        for check in CHECKS:
            start = time.perf_counter()
            check(g)
            times[check.__name__].append(time.perf_counter() - start)
    report = {"numel": args.numel, "threads": args.threads, "torch": torch.__version__, "checks": {}}
    for check in CHECKS:
        verdicts = {case: bool(check(tensor)) for case, tensor in cases.items()}
        right = verdicts == {"finite": True, "huge finite": True, "inf": False, "nan": False}
        report["checks"][check.__name__] = {"ms": 1e3 * statistics.median(times[check.__name__]),
                                            "says_finite": verdicts, "correct": right}
        print(f"{check.__name__:>18}: {report['checks'][check.__name__]['ms']:7.2f} ms  "
              f"{'correct' if right else 'WRONG'} {verdicts}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
