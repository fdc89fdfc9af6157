"""Paired comparisons of finished ``spamopt compare`` runs: for each pair (A, B) of labels, the difference in
final validation loss over the seeds both ran (same initial weights and data order per seed), its mean, sample
std and 95 % t-interval, and a verdict: A better (the interval lies below 0), B better, or not separated.
Also each label's validation perplexity, mean ± std and per seed (a diverged run's is inf, and its pairs say
so). Labels are folders under the runs directory, so ``nullify/adamw:ablation/adamw`` compares two
experiments. Writes JSON and prints a markdown table.

    python benchmarks/claims.py runs/study/ablation spam:adamw spam:adam-clip spam-off:adamw-eps6 \\
        spam-clip-only:spam-off spam-reset-only:spam-off spam:spam-no-warmup --out results/claims.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from spamopt.experiments.lm.train import perplexity

# two-sided 95 % quantiles of Student's t for 1..10 degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _losses(out: Path, label: str) -> dict[int, float]:
    losses = {}
    for summary in sorted((out / label).glob("seed*/summary.json")):
        data = json.loads(summary.read_text())
        losses[data["seed"]] = data["val_loss"]
    if not losses:
        raise SystemExit(f"no finished runs in {out / label}")
    return losses


def paired(out: Path, a: str, b: str) -> dict:
    la, lb = _losses(out, a), _losses(out, b)
    seeds = sorted(set(la) & set(lb))
    diffs = [la[s] - lb[s] for s in seeds]
    if not all(math.isfinite(la[s]) and math.isfinite(lb[s]) for s in seeds):
        return {"a": a, "b": b, "seeds": seeds, "loss_differences": diffs, "mean": math.nan, "std": math.nan,
                "ci95": [math.nan, math.nan], "verdict": "a run diverged (non-finite loss)"}
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    half = T95.get(len(diffs) - 1, 1.96) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    verdict = f"{a} better" if mean + half < 0 else f"{b} better" if mean - half > 0 else "not separated"
    return {"a": a, "b": b, "seeds": seeds, "loss_differences": diffs, "mean": mean, "std": std,
            "ci95": [mean - half, mean + half], "verdict": verdict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("pairs", nargs="+", help="A:B label pairs")
    parser.add_argument("--out", type=Path, default=Path("results/claims.json"))
    args = parser.parse_args()
    labels = sorted({label for pair in args.pairs for label in pair.split(":")})
    perplexities = {}
    for label in labels:
        values = [perplexity(v) for v in _losses(args.out_dir, label).values()]
        finite = all(math.isfinite(v) for v in values)
        perplexities[label] = [statistics.fmean(values) if finite else math.inf,
                               statistics.stdev(values) if len(values) > 1 and finite else None, values]
    comparisons = [paired(args.out_dir, *pair.split(":")) for pair in args.pairs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": str(args.out_dir), "perplexity": perplexities,
                                    "comparisons": comparisons}, indent=2) + "\n")
    print("| label | validation perplexity | per seed |\n| --- | --- | --- |")
    for label, (mean, std, values) in sorted(perplexities.items(), key=lambda kv: kv[1][0]):
        seeds = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {label} | {mean:.2f} ± {'n/a' if std is None else f'{std:.2f}'} | {seeds} |")
    print("\n| A − B | loss difference, mean [95 % CI] | seeds | verdict |\n| --- | --- | --- | --- |")
    for c in comparisons:
        print(f"| {c['a']} − {c['b']} | {c['mean']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | "
              f"{len(c['seeds'])} | {c['verdict']} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
