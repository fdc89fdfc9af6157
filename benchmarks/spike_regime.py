"""Issue 28's search: a configuration this CPU can train in which AdamW's gradients spike in the transformer
blocks (attention, MLP and norm weights), not only in the embedding and head rows of rare tokens.

Each probe is one ``spamopt train`` run of AdamW with ``--forensics`` (the spike census plus update RMS,
attention logits and the output log-sum-exp), a change of one or two settings from a base; probes run as
parallel single-thread processes, and finished runs are reused (``--resume``), so the search continues across
sessions. Per probe and seed the table gives: block-weight spikes per million coordinate-steps by layer type
(GSS > 50; block gradients are dense, so no block coordinate is ever a first appearance), the largest
block-weight GSS, loss spikes (``spamopt spikes report``'s rule: a rise above the running median of 6 robust
standard deviations) with the largest rise in those units, the largest attention logit, the final
validation loss and whether the run diverged. Writes ``results/spike_regime.json`` and prints the markdown table.

    python benchmarks/spike_regime.py --workers 2                      # every probe not yet run, seed 0
    python benchmarks/spike_regime.py --probes small-lr1e-2,small-lr1e-2-qknorm --seeds 0,1,2
    python benchmarks/spike_regime.py --list                           # the probes and their settings
    python benchmarks/spike_regime.py --table-only                     # the table of what has finished
    python benchmarks/spike_regime.py --claims tiny-lr1e-1 --seeds 0,1,2  # the claims at a probe's settings

``--claims PROBE`` measures the paper's claims at that probe's settings: ``spamopt compare`` of Adam with
global-norm clipping, SPAM, SPAM with its features off, clipping only, reset only and Stable-SPAM, and AdamW
with ``--nullify-spikes``, all with ``--forensics`` and the probe's seeds, in ``<out>/<probe>-claims``; AdamW is
the probe's own runs (linked there as ``adamw``, same settings); then ``benchmarks/claims.py``'s paired
intervals, the spike census of each optimizer by layer type, and a figure of the first seed's runs side by side
(loss, largest attention logit, block-weight spikes so far, per step) in ``docs/images/spike-regime-claims-PROBE.png``.

The data default to the Gutenberg shards in ``../shared/data/gutenberg`` when present (where the GPU census
at 60M found block-weight spikes), else the embedded standard-library corpus; each row names its data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from spamopt.spikes.layers import BLOCK_TYPES
from spamopt.spikes.report import attention_logits, census, load_records, summarize

BASE = {"model": "mini", "seq_len": 128, "batch_size": 16, "steps": 600, "warmup_steps": 60, "lr": 1e-2,
        "eval_every": 100, "checkpoint_every": 100, "eval_tokens": 32768, "max_train_tokens": 4_000_000}
# One or two settings changed from BASE per probe; ordered cheapest first (tiny and mini: minutes per run on one
# core; small, 9M parameters in 6 blocks: about half an hour).
PROBES: dict[str, dict[str, Any]] = {
    "tiny-lr1e-1": {"model": "tiny", "lr": 1e-1},
    "tiny-lr1e-1-qknorm": {"model": "tiny", "lr": 1e-1, "qk_norm": True},
    "tiny-lr1e-1-zloss": {"model": "tiny", "lr": 1e-1, "z_loss": 1e-4},
    "tiny-lr3e-2": {"model": "tiny", "lr": 3e-2},
    "tiny-lr3e-1": {"model": "tiny", "lr": 3e-1},
    "tiny-lr1e-1-nowarmup": {"model": "tiny", "lr": 1e-1, "warmup_steps": 0},
    "tiny-lr1e-1-beta2-0.95": {"model": "tiny", "lr": 1e-1, "optimizer_args": {"betas": [0.9, 0.95]}},
    "tiny-lr1e-1-1500steps": {"model": "tiny", "lr": 1e-1, "steps": 1500, "warmup_steps": 150},
    "tiny-lr1e-1-stdlib": {"model": "tiny", "lr": 1e-1, "data": "stdlib"},
    "tiny-lr1e-1-qknorm-stdlib": {"model": "tiny", "lr": 1e-1, "qk_norm": True, "data": "stdlib"},
    "tiny-lr1e-2": {"model": "tiny", "lr": 1e-2},
    "tiny-lr1e-1-eps1e-12": {"model": "tiny", "lr": 1e-1, "optimizer_args": {"eps": 1e-12}},
    "tiny-lr1e-1-batch4": {"model": "tiny", "lr": 1e-1, "batch_size": 4},
    "tiny-lr1e-1-int4": {"model": "tiny", "lr": 1e-1, "quant": "int4"},
    "tiny-lr1e-1-bf16": {"model": "tiny", "lr": 1e-1, "pure_bf16": True},
    "tiny-lr1e-1-wd0.1": {"model": "tiny", "lr": 1e-1, "weight_decay": 0.1},
    "tiny-lr3e-1-qknorm": {"model": "tiny", "lr": 3e-1, "qk_norm": True},
    "mini-lr1e-2": {},
    "mini-lr3e-2": {"lr": 3e-2},
    "mini-lr1e-1": {"lr": 1e-1},
    "mini-lr3e-2-nowarmup": {"lr": 3e-2, "warmup_steps": 0},
    "mini-lr3e-2-beta2-0.95": {"lr": 3e-2, "optimizer_args": {"betas": [0.9, 0.95]}},
    "mini-lr3e-2-eps1e-12": {"lr": 3e-2, "optimizer_args": {"eps": 1e-12}},
    "mini-lr3e-2-batch4": {"lr": 3e-2, "batch_size": 4},
    "mini-lr3e-2-seq256": {"lr": 3e-2, "seq_len": 256},
    "mini-lr3e-2-int4": {"lr": 3e-2, "quant": "int4"},
    "mini-lr3e-2-qknorm": {"lr": 3e-2, "qk_norm": True},
    "mini-lr3e-2-zloss": {"lr": 3e-2, "z_loss": 1e-4},
    "mini-lr3e-2-1500steps": {"lr": 3e-2, "steps": 1500, "warmup_steps": 150},
    "small-lr3e-3": {"model": "small", "lr": 3e-3},
    "small-lr1e-2": {"model": "small"},
    "small-lr3e-2": {"model": "small", "lr": 3e-2},
    "small-lr1e-2-nowarmup": {"model": "small", "warmup_steps": 0},
    "small-lr1e-2-beta2-0.95": {"model": "small", "optimizer_args": {"betas": [0.9, 0.95]}},
    "small-lr1e-2-qknorm": {"model": "small", "qk_norm": True},
    "small-lr1e-2-zloss": {"model": "small", "z_loss": 1e-4},
    "small-lr1e-2-eps1e-12": {"model": "small", "optimizer_args": {"eps": 1e-12}},
}
# SPAM's schedule scaled to a 600-step run as the pre-training study scales it (a reset every 100 steps, a
# 30-step warmup after each: the paper's N = 0.3 ΔT), and the controls that isolate its two mechanisms.
CLAIM_OPTIMIZERS = ("adam-clip,spam,spam-off=spam,spam-clip-only=spam,spam-reset-only=spam,stable-spam")
CLAIM_ARGS = {"spam": {"reset_interval": 100, "warmup_steps": 30},
              "spam-off": {"threshold": 0, "reset_interval": 0, "warmup_steps": 0},
              "spam-clip-only": {"reset_interval": 0, "warmup_steps": 0}, "spam-reset-only": {"threshold": 0}}
CLAIM_PAIRS = ("spam:adamw", "spam:adam-clip", "spam-off:adamw", "spam-clip-only:spam-off",
               "spam-reset-only:spam-off", "stable-spam:adamw", "stable-spam:adam-clip", "nullify/adamw:adamw")
GUTENBERG = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg"


def _arguments(settings: dict[str, Any]) -> list[str]:
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        else:
            args += [flag, str(value)]
    return args


def _command(probe: str, seed: int, data: str, out: Path, **override: Any) -> list[str]:
    settings = {**BASE, "data": data, **PROBES[probe], "seed": seed, "optimizer": "adamw",
                "cache_dir": str(out / "cache"), "run_dir": str(out / probe / f"seed{seed}"), **override}
    return [sys.executable, "-m", "spamopt.cli", "train", *_arguments(settings), "--forensics", "--no-progress",
            "--resume"]


def _compare_command(probe: str, seeds: list[int], data: str, out: Path, workers: int, optimizers: str,
                     optimizer_args: dict[str, Any], *extra: str) -> list[str]:
    """``spamopt compare`` at the probe's settings: the same flags as the probe's ``spamopt train`` runs, so
    that seed for seed every run starts from the same weights and sees the same batches."""
    settings = {key: value for key, value in {**BASE, "data": data, **PROBES[probe]}.items()
                if key != "optimizer_args"}
    settings.update(cache_dir=str(out.parent / "cache"), out_dir=str(out), workers=workers,
                    seeds=",".join(map(str, seeds)), optimizers=optimizers, optimizer_args=optimizer_args)
    return [sys.executable, "-m", "spamopt.cli", "compare", *_arguments(settings), "--forensics", "--no-progress",
            *extra]


def claims(probe: str, seeds: list[int], data: str, out: Path, workers: int, results: Path) -> None:
    """The paper's claims at ``probe``'s settings (see the module's docstring)."""
    if PROBES[probe].get("optimizer_args"):
        raise SystemExit(f"--claims needs a probe with AdamW's default arguments, not {probe}")
    target = out / f"{probe}-claims"
    target.mkdir(parents=True, exist_ok=True)
    adamw = target / "adamw"
    if not adamw.exists():
        adamw.symlink_to(Path("..") / probe, target_is_directory=True)
    missing = [s for s in seeds if row(out / probe / f"seed{s}") is None]
    if missing:
        raise SystemExit(f"run the probe first: python benchmarks/spike_regime.py --probes {probe} "
                         f"--seeds {','.join(map(str, missing))}")
    compares = [_compare_command(probe, seeds, data, target, workers, CLAIM_OPTIMIZERS, CLAIM_ARGS),
                _compare_command(probe, seeds, data, target / "nullify", workers, "adamw", {}, "--nullify-spikes")]
    for command in compares:
        if _run(command, target / "compare.log") != 0:
            raise SystemExit(f"a comparison failed: see {target / 'compare.log'}")
    subprocess.run([sys.executable, str(Path(__file__).with_name("claims.py")), str(target), *CLAIM_PAIRS,
                    "--out", str(results.with_name(f"claims_{probe}.json"))], check=True)
    labels = ["adamw", "adam-clip", "spam", "spam-off", "spam-clip-only", "spam-reset-only", "stable-spam",
              "nullify/adamw"]
    print(figure(target, labels, seeds[0], Path("docs/images") / f"spike-regime-claims-{probe}.png"))
    print("\n| optimizer | block spikes / M, per seed (attn, mlp, norm: mean) | largest attention logit, mean | "
          "coordinates clipped, mean (in block weights) | largest loss rise (robust SDs), per seed | "
          "val loss, mean |\n| --- | --- | ---: | ---: | --- | ---: |")
    for label in labels:
        rows = [found for s in seeds if (found := row(target / label / f"seed{s}")) is not None]
        if not rows:
            continue
        mean = {k: sum(r["rates_per_million"].get(k, 0.0) for r in rows) / len(rows) for k in BLOCK_TYPES}
        per_seed = ", ".join(f"{r['block_spikes_per_million']:.1f}" for r in rows)
        print(f"| {label} | {per_seed} "
              f"({', '.join(f'{mean[k]:.1f}' for k in BLOCK_TYPES)}) | "
              f"{sum(r['max_attention_logit'] for r in rows) / len(rows):.3g} | "
              f"{_clipped(rows)} | "
              f"{', '.join(f'{rise:.1f}' for rise in (r['largest_loss_rise'] for r in rows))} | "
              f"{sum(r['val_loss'] for r in rows) / len(rows):.3f} |")


def _clipped(rows: list[dict[str, Any]]) -> str:
    """Mean coordinates clipped over the seeds, and within them the block weights'; n/a for an optimizer
    that does not count its clipping."""
    if any(r["clipped"] is None for r in rows):
        return "n/a"
    block = sum(r["clipped_by_type"].get(k, 0) for r in rows for k in BLOCK_TYPES)
    return f"{sum(r['clipped'] for r in rows) / len(rows):,.0f} ({block / len(rows):,.0f})"


def figure(target: Path, labels: list[str], seed: int, path: Path) -> Path:
    """One seed's runs of every optimizer side by side: training loss (a 20-step mean), the largest attention
    logit of any layer, and the block-weight coordinates that have spiked so far (GSS > 50), per step."""
    from spamopt.plotting import pyplot, save

    plt = pyplot()
    fig, (loss_ax, logit_ax, spike_ax) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for label in labels:
        run_dir = target / label / f"seed{seed}"
        if not (run_dir / "summary.json").exists():
            continue
        records = load_records(run_dir / "spikes")
        raw = [(r["step"], r["loss"]) for r in records if r["kind"] == "loss"]
        # a 20-step running mean: eight noisy curves on one axis are unreadable
        windows = [(step, [v for _, v in raw[max(0, i - 19):i + 1]]) for i, (step, _) in enumerate(raw)]
        losses = [(step, sum(window) / len(window)) for step, window in windows]
        logits = sorted(attention_logits(records).items())
        per_step = summarize(records)["spikes_per_step"]
        block, total = [], 0
        for step, counts in sorted(per_step.items()):
            total += sum(counts.get(k, 0) for k in BLOCK_TYPES)
            block.append((step, total))
        for ax, points in ((loss_ax, losses), (logit_ax, logits), (spike_ax, block)):
            if points:
                ax.plot(*zip(*points), lw=0.9, label=label)
    loss_ax.set_ylabel("training loss\n(20-step mean)")
    loss_ax.set_title(f"{target.name.removesuffix('-claims')}, seed {seed}: each optimizer")
    loss_ax.legend(ncol=4, fontsize=8)
    logit_ax.set_yscale("log")
    logit_ax.set_ylabel("largest attention logit")
    spike_ax.set_yscale("symlog")
    spike_ax.set_ylim(bottom=0)
    spike_ax.set_ylabel("block-weight spikes\nso far (GSS > 50)")
    spike_ax.set_xlabel("step")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, path)


def _run(command: list[str], log: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as handle:
        return subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode


def row(run_dir: Path) -> dict[str, Any] | None:
    """The table's figures for one finished run (None if it has not finished): :func:`census`'s, the final
    validation loss, divergence and the data's name."""
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    config = json.loads((run_dir / "config.json").read_text())
    return {**census(load_records(run_dir / "spikes")), "val_loss": summary.get("val_loss"),
            "diverged": summary.get("diverged"), "data": Path(config["data"]).name}


def table(out: Path, probes: list[str]) -> tuple[dict[str, Any], str]:
    results: dict[str, Any] = {}
    lines = ["| probe | settings | seed | block spikes / M (attn, mlp, norm) | largest block GSS | loss spikes "
             "(largest rise, robust SDs) | largest attention logit | val loss | data |",
             "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | --- |"]
    for probe in probes:
        settings = ", ".join(f"{k} {v}" for k, v in {**BASE, **PROBES[probe]}.items() if k in PROBES[probe]
                             or k in ("model", "lr")) or "base"
        for run_dir in sorted((out / probe).glob("seed*")):
            found = row(run_dir)
            if found is None:
                continue
            results.setdefault(probe, {})[run_dir.name] = found
            r = found["rates_per_million"]
            by_type = ", ".join(f"{r.get(k, 0.0):.2f}" for k in BLOCK_TYPES)
            val = "diverged" if found["diverged"] else f"{found['val_loss']:.3f}"
            lines.append(f"| {probe} | {settings} | {run_dir.name.removeprefix('seed')} | "
                         f"**{found['block_spikes_per_million']:.2f}** ({by_type}) | {found['max_block_gss']:.0f} | "
                         f"{len(found['loss_spikes'])} {found['loss_spikes'][:4] or ''}"
                         f"{' ' if found['loss_spikes'] else ''}({found['largest_loss_rise']:.1f}) | "
                         f"{found['max_attention_logit']:.1f} | {val} | {found['data']} |")
    return results, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", default=",".join(PROBES), help="comma-separated probe names (default: all)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--data", default=str(GUTENBERG) if GUTENBERG.exists() else "stdlib")
    parser.add_argument("--out", type=Path, default=Path("runs/spike_regime"))
    parser.add_argument("--results", type=Path, default=Path("results/spike_regime.json"))
    parser.add_argument("--list", action="store_true", help="print the probes and exit")
    parser.add_argument("--table-only", action="store_true", help="only tabulate the finished runs")
    parser.add_argument("--claims", metavar="PROBE", help="measure the paper's claims at this probe's settings")
    args = parser.parse_args()
    if args.claims:
        if args.claims not in PROBES:
            parser.error(f"unknown probe {args.claims!r}; --list shows them")
        claims(args.claims, [int(s) for s in args.seeds.split(",")], args.data, args.out, args.workers,
               args.results)
        return
    probes = [p for p in args.probes.split(",") if p]
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        parser.error(f"unknown probes {unknown}; --list shows them")
    if args.list:
        for name in probes:
            print(f"{name}: {PROBES[name] or 'base'}")
        print(f"base: {BASE}")
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.table_only:
        args.out.mkdir(parents=True, exist_ok=True)
        # tokenize each corpus once, so that the runs side by side do not race on the cache
        first_of_each = {PROBES[p].get("data", args.data): p for p in reversed(probes)}
        for probe in first_of_each.values():
            tokenize = _command(probe, seeds[0], args.data, args.out, steps=1, run_dir=str(args.out / "tokenize"))
            if _run([*tokenize[:-1], "--overwrite"], args.out / "tokenize.log") != 0:
                raise SystemExit(f"tokenizing failed: see {args.out / 'tokenize.log'}")
        jobs = [(p, s) for p in probes for s in seeds if row(args.out / p / f"seed{s}") is None]
        with ThreadPoolExecutor(args.workers) as pool:
            codes = list(pool.map(lambda job: _run(_command(*job, args.data, args.out),
                                                   args.out / f"{job[0]}-seed{job[1]}.log"), jobs))
        for (probe, seed), code in zip(jobs, codes):
            if code not in (0, 1):  # 1: the run diverged and said so; anything else is a failure
                print(f"{probe} seed {seed} failed ({code}): see {args.out / f'{probe}-seed{seed}.log'}")
    results, text = table(args.out, probes)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"base": BASE, "probes": {p: PROBES[p] for p in probes},
                                        "results": results}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
