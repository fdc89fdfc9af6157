"""``spamopt compare``: optimizers × seeds, the report's mean ± std from the runs' own summaries, reuse of
finished runs, and the README's main command on a minimal budget."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from spamopt.experiments.lm.compare import CompareConfig, compare


def test_compare_writes_a_report_with_mean_and_std_over_seeds(small_run, tmp_path):
    """Two optimizers × two seeds: the report's mean ± std is computed from the runs' own summaries, the PNG
    exists, and a second call reuses the finished runs instead of training again."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "compare"
    base = replace(small_run, steps=4, checkpoint_every=0, eval_every=0)
    report = compare(CompareConfig(optimizers="spam,adamw", seeds="0,1", out_dir=str(out)), base)
    results = json.loads((out / "results.json").read_text())
    for name in ("spam", "adamw"):
        ppl = [json.loads((out / name / f"seed{s}" / "summary.json").read_text())["val_perplexity"] for s in (0, 1)]
        row = results["optimizers"][name]
        assert row["val_perplexity_mean"] == pytest.approx(sum(ppl) / 2)
        assert row["val_perplexity_std"] == pytest.approx(abs(ppl[0] - ppl[1]) / math.sqrt(2))
        assert f"{row['val_perplexity_mean']:.2f} ± {row['val_perplexity_std']:.2f}" in report.read_text()
    assert (out / "curves.png").stat().st_size > 10_000
    stamp = (out / "spam" / "seed0" / "summary.json").stat().st_mtime_ns
    compare(CompareConfig(optimizers="spam,adamw", seeds="0,1", out_dir=str(out)), base)
    assert (out / "spam" / "seed0" / "summary.json").stat().st_mtime_ns == stamp


def test_the_report_gives_the_spike_census_of_monitored_runs(small_run, tmp_path):
    """With ``--forensics`` the report has a row per optimizer holding each seed's block-weight spike rate and
    the largest attention logit, the figures ``spamopt.spikes.report.census`` computes from that run's own
    records; without telemetry it has no spike table."""
    pytest.importorskip("matplotlib")
    from spamopt.spikes.report import census, load_records

    base = replace(small_run, steps=4, checkpoint_every=0, eval_every=0, forensics=True)
    out = tmp_path / "monitored"
    report = compare(CompareConfig(optimizers="spam,adamw", seeds="0,1", out_dir=str(out)), base).read_text()
    for name in ("spam", "adamw"):
        figures = [census(load_records(out / name / f"seed{s}" / "spikes")) for s in (0, 1)]
        per_seed = ", ".join(f"{f['block_spikes_per_million']:.2f}" for f in figures)
        logit = (figures[0]["max_attention_logit"] + figures[1]["max_attention_logit"]) / 2
        assert f"| {name} | {per_seed} |" in report and f"| {logit:.3g} |" in report
    plain = compare(CompareConfig(optimizers="adamw", seeds="0", out_dir=str(tmp_path / "plain")),
                    replace(base, forensics=False)).read_text()
    assert "block-weight spikes" not in plain


def test_the_main_command_on_a_minimal_budget(token_cache, tmp_path, capsys):
    """``spamopt compare`` with its defaults (SPAM, AdamW, Adam + clipping; two seeds; the embedded stdlib
    corpus) on a budget of 3 steps: every run finishes with a finite perplexity and the report is written."""
    from spamopt.cli import main

    out = tmp_path / "compare"
    main(["compare", "--model", "tiny", "--steps", "3", "--vocab-size", "300", "--seq-len", "32", "--batch-size",
          "4", "--eval-tokens", "512", "--out-dir", str(out), "--cache-dir", str(token_cache), "--no-progress"])
    assert capsys.readouterr().out.strip().endswith("report.md")
    results = json.loads((out / "results.json").read_text())
    assert set(results["optimizers"]) == {"spam", "adamw", "adam-clip"} and results["seeds"] == [0, 1]
    assert results["config"]["data"] == "stdlib"
    assert all(math.isfinite(v) for row in results["optimizers"].values() for v in row["val_perplexity"])
    assert (out / "curves.png").exists() and "| spam |" in (out / "report.md").read_text()
    # the three optimizers' states differ by a few bytes per tensor: said, not plotted as noise
    assert "Optimizer state (MiB)" in (out / "report.md").read_text().split("so not plotted")[0]


def test_memory_figures_equal_to_within_one_percent_are_not_plotted(tmp_path):
    """``plot_memory`` draws only the memory figures that differ by more than 1 % between optimizers, and
    nothing (no file) when none does."""
    from spamopt.experiments.lm.compare import equal_memory, plot_memory

    def results(state_b, peak_b):
        row = {"val_perplexity_mean": 5.0, "val_perplexity_std": 0.1}
        return {"seeds": [0, 1], "optimizers": {
            "a": {**row, "optimizer_state_bytes_per_process": 1000, "peak_step_memory_bytes": 10_000},
            "b": {**row, "optimizer_state_bytes_per_process": state_b, "peak_step_memory_bytes": peak_b}}}

    mixed = results(1009, 20_000)
    assert equal_memory(mixed, "optimizer_state_bytes_per_process")
    assert not equal_memory(mixed, "peak_step_memory_bytes")
    assert plot_memory(mixed, tmp_path / "mixed.png").exists()
    assert not equal_memory(results(1011, 10_000), "optimizer_state_bytes_per_process")
    assert plot_memory(results(1009, 10_050), tmp_path / "equal.png") is None
    assert not (tmp_path / "equal.png").exists()


def test_match_memory_runs_galore_at_the_budgets_rank(small_run, tmp_path, monkeypatch):
    """``--match-memory galore:R`` used to leave GaLore at hidden/4 (rank 16 on the tiny model at galore:32):
    the GaLore entry now runs at rank R, and one given its own rank keeps it. (The configs are checked as
    ``compare`` builds them; galore-torch itself is not needed.)"""
    from spamopt.experiments.lm import compare as lm_compare

    built: list = []

    def record(out, names, seeds, make_run, execute, workers=1):
        built.extend(make_run(name, seed, out / name / f"seed{seed}") for name in names for seed in seeds)
        raise SystemExit

    monkeypatch.setattr(lm_compare, "run_grid", record)
    grid = CompareConfig(optimizers="galore,own=galore,spam-sparse", seeds="0", out_dir=str(tmp_path / "m"),
                         match_memory="galore:32", optimizer_args={"own": {"rank": 8}})
    with pytest.raises(SystemExit):
        compare(grid, small_run)
    options = {c.run_dir.split("/")[-2]: c.optimizer_args for c in built}
    assert options["galore"]["rank"] == 32 and options["own"]["rank"] == 8
    assert options["spam-sparse"]["density"] == lm_compare.matched_memory("galore:32", "tiny")["density"]


def test_match_masks_counts_the_bitmasks_in_the_budget():
    """With ``match_masks`` the 1-bit masks come out of the same budget: a lower density, and moments plus
    masks within one rounding step of the budget (without it, the moments alone are)."""
    from spamopt.experiments.lm.compare import matched_memory

    moments, both = matched_memory("galore:16", "mini"), matched_memory("galore:16", "mini", include_mask=True)
    assert both["density"] < moments["density"] and both["counts_masks"] and not moments["counts_masks"]
    assert abs(both["spam_sparse_bytes"] - both["budget_bytes"]) < 0.002 * both["budget_bytes"]


def test_match_memory_sets_the_sparse_density_and_reports_both_figures(small_run, tmp_path):
    """``--match-memory galore:8`` gives spam-sparse the density whose state on the block matrices equals
    GaLore's at rank 8, and the report states the budget and spam-sparse's own figure."""
    pytest.importorskip("matplotlib")
    from spamopt.experiments.lm.compare import matched_memory

    out = tmp_path / "matched"
    base = replace(small_run, steps=2, checkpoint_every=0, eval_every=0)
    report = compare(CompareConfig(optimizers="spam-sparse", seeds="0", out_dir=str(out), match_memory="galore:8"),
                     base)
    matched = matched_memory("galore:8", base.model)
    config = json.loads((out / "spam-sparse" / "seed0" / "config.json").read_text())
    assert config["optimizer_args"]["density"] == matched["density"]
    assert f"density {matched['density']}, matched to GaLore rank 8" in report.read_text()


def test_labelled_entries_memory_figure_and_parallel_workers(small_run, tmp_path):
    """The issue's memory comparison in miniature: spam-sparse at the matched density and, under a label, at
    0.25, run by two single-thread workers. Each row keeps its own density and state (the 0.25 one holds less),
    every run measured its peak step memory, which holds weights, gradients and the whole state (so AdamW's
    peak is above sparse SPAM's by a good part of the state it saves), and the report carries the
    perplexity-against-memory figure."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "memory"
    base = replace(small_run, steps=2, checkpoint_every=0, eval_every=0)
    config = CompareConfig(optimizers="spam-sparse,sparse-0.25=spam-sparse,adamw", seeds="0", out_dir=str(out),
                           match_memory="galore:16", workers=2,
                           optimizer_args={"sparse-0.25": {"density": 0.25}, "spam-sparse": {"warmup_steps": 1}})
    report = compare(config, base).read_text()
    rows = json.loads((out / "results.json").read_text())["optimizers"]
    matched = json.loads((out / "results.json").read_text())["matched_memory"]["density"]
    assert rows["spam-sparse"]["optimizer_args"] == {"warmup_steps": 1, "density": matched}
    assert rows["sparse-0.25"]["optimizer_args"] == {"warmup_steps": 1, "density": 0.25}  # the name's, then its own
    assert matched > 0.25 and (rows["sparse-0.25"]["optimizer_state_bytes_per_process"]
                               < rows["spam-sparse"]["optimizer_state_bytes_per_process"]
                               < rows["adamw"]["optimizer_state_bytes_per_process"])
    parameter_bytes = 4 * json.loads((out / "results.json").read_text())["parameters"]
    for row in rows.values():  # weights, their gradients and the whole state are alive in a measured step
        assert row["peak_step_memory_bytes"] >= 2 * parameter_bytes + row["optimizer_state_bytes_per_process"]
    state_saved = (rows["adamw"]["optimizer_state_bytes_per_process"]
                   - rows["sparse-0.25"]["optimizer_state_bytes_per_process"])
    assert rows["adamw"]["peak_step_memory_bytes"] - rows["sparse-0.25"]["peak_step_memory_bytes"] >= state_saved // 2
    assert "| sparse-0.25 (`spam-sparse`, density 0.25) |" in report
    assert f"| spam-sparse (density {matched}) |" in report
    assert "![final validation perplexity against memory](memory.png)" in report
    assert (out / "memory.png").stat().st_size > 10_000
