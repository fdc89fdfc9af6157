"""SpikeMonitor against planted spikes and a float64 reference of the Gradient Spike Score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spamopt import SPAM
from spamopt.spikes import SpikeMonitor, depth, layer_type
from spamopt.spikes.report import build_report, census, load_records, summarize


def _named(shapes):
    return [(name, torch.nn.Parameter(torch.zeros(shape))) for name, shape in shapes.items()]


SHAPES = {"layers.0.attn.q.weight": (6, 8), "layers.0.attn_norm.weight": (8,), "head.weight": (4, 8)}


def _stationary(rng, shape):
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def _records(run_dir, kind="tensor"):
    return [r for r in load_records(run_dir) if r["kind"] == kind]


def _observe_planted(run_dir, planted, signals=None):
    """100 steps of ±0.1 sign noise on :data:`SHAPES`, with the ``{(step, name): [coordinate, ...]}`` planted
    1000x, monitored into ``run_dir`` (``signals(step)``, if given, passed to ``observe``); returns the
    parameters."""
    rng = np.random.default_rng(0)
    named = _named(SHAPES)
    with SpikeMonitor(named, run_dir, flush_every=7) as monitor:
        for step in range(1, 101):
            for name, p in named:
                g = (0.1 * rng.choice([-1, 1], size=p.shape)).astype(np.float32)
                for coord in planted.get((step, name), []):
                    g[coord] *= 1000.0
                p.grad = torch.from_numpy(g)
            monitor.observe(signals=signals(step) if signals else None)
    return named


def test_planted_spikes_are_found_exactly(tmp_path):
    """Three 1000x spikes planted at known (tensor, step, coordinate) after 80 steps of Gaussian noise: the
    monitor reports exactly those counts at exactly those steps and tensors, and nothing else."""
    planted = {(85, "layers.0.attn_norm.weight"): [(3,)], (90, "head.weight"): [(1, 2), (3, 7)]}
    _observe_planted(tmp_path, planted)
    found = {(r["step"], r["name"]): r["spikes"] for r in _records(tmp_path) if r["spikes"]}
    assert found == {key: len(coords) for key, coords in planted.items()}


def test_gss_matches_a_float64_reference(tmp_path):
    rng = np.random.default_rng(1)
    named = _named({"w": (5, 7)})
    grads = [rng.standard_normal((5, 7)) * rng.lognormal(0, 2, size=(5, 7)) for _ in range(60)]
    grads[0][0, 0] = 0.0  # a coordinate that is zero at first
    with SpikeMonitor(named, tmp_path, threshold=3.0, flush_every=9) as monitor:
        for g in grads:
            named[0][1].grad = torch.tensor(g, dtype=torch.float32)
            monitor.observe()
    records = _records(tmp_path)
    history = np.zeros((5, 7))
    for t, (g, record) in enumerate(zip(grads, records), start=1):
        history += np.abs(np.float32(g).astype(np.float64))
        gss = np.abs(np.float32(g)) / (history / t)
        gss = np.nan_to_num(gss)
        assert record["step"] == t
        assert record["spikes"] == int((gss > 3.0).sum())
        assert record["max_gss"] == pytest.approx(gss.max(), rel=1e-5)
        assert record["spike_fraction"] == pytest.approx((gss > 3.0).mean(), rel=1e-6)
        assert record["grad_norm"] == pytest.approx(np.linalg.norm(np.float32(g)), rel=1e-5)


def test_stationary_stream_yields_no_spikes(tmp_path):
    rng = np.random.default_rng(2)
    named = _named(SHAPES)
    with SpikeMonitor(named, tmp_path) as monitor:
        for _ in range(200):
            for _, p in named:
                p.grad = torch.from_numpy(_stationary(rng, p.shape))
            monitor.observe()
    assert sum(r["spikes"] for r in _records(tmp_path)) == 0


def test_tensor_mode_z_scores_match_welford_reference(tmp_path):
    rng = np.random.default_rng(3)
    named = _named({"w": (10,)})
    norms = []
    with SpikeMonitor(named, tmp_path, mode="tensor", flush_every=4) as monitor:
        for step in range(30):
            g = _stationary(rng, (10,)) * (100.0 if step == 25 else 1.0)
            norms.append(np.linalg.norm(g.astype(np.float64)))
            named[0][1].grad = torch.from_numpy(g)
            monitor.observe()
    records = _records(tmp_path)
    assert "spikes" not in records[0]
    for t, record in enumerate(records):
        past = np.array(norms[:t])
        expected = 0.0 if t < 2 else (norms[t] - past.mean()) / past.std(ddof=1)
        assert record["norm_z"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert records[25]["norm_z"] > 50


def test_nullify_zeroes_exactly_the_spiking_coordinates(tmp_path):
    named = _named({"w": (4, 4)})
    with SpikeMonitor(named, tmp_path, nullify=True, threshold=10.0) as monitor:
        for step in range(1, 31):
            g = torch.full((4, 4), 0.5)
            if step == 30:
                g[2, 1] = 500.0
            named[0][1].grad = g
            monitor.observe()
    expected = torch.full((4, 4), 0.5)
    expected[2, 1] = 0.0
    assert torch.equal(named[0][1].grad, expected)


def test_spam_statistics_are_recorded_through_the_step_hook(tmp_path):
    """Clipped counts per tensor equal a direct count of g² > θ·v on the same step, and the census sums them
    under the tensor's layer type; resets are logged."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(64))
    opt = SPAM([p], threshold=25.0, clip_delay=2, reset_interval=8, warmup_steps=2)
    expected = []
    with SpikeMonitor([("layers.0.mlp.up.weight", p)], tmp_path, optimizer=opt, flush_every=5) as monitor:
        for step in range(1, 13):
            g = torch.randn(64) * (30.0 if step in (5, 11) else 1.0)
            v = opt.state[p]["exp_avg_sq"].clone() if opt.state else torch.zeros(64)
            active = step >= 2 and step % 8 >= 2
            expected.append(int((g * g > 25.0 * v).sum()) if active else 0)
            p.grad = g
            monitor.observe()
            opt.step()
    records = _records(tmp_path, "optimizer")
    assert [sum(r["clipped"].values()) for r in records] == expected
    assert expected[4] > 0 and expected[10] > 0
    figures = census(load_records(tmp_path))
    assert figures["clipped"] == sum(expected) and figures["clipped_by_type"] == {"mlp": sum(expected)}
    assert [r["step"] for r in records if r["reset"]] == [8]
    assert records[7]["warmup_multiplier"] == pytest.approx(0.01)
    assert opt.record_statistics is False  # closing the monitor stops the optimizer's extra counting


def test_report_renders_pngs_and_summary(tmp_path):
    rng = np.random.default_rng(4)
    named = _named(SHAPES)
    p = named[0][1]
    opt = SPAM([q for _, q in named], lr=1e-2, reset_interval=30, clip_delay=2, warmup_steps=5)
    with SpikeMonitor(named, tmp_path, optimizer=opt, flush_every=10) as monitor:
        for step in range(1, 81):
            for _, q in named:
                q.grad = torch.from_numpy(_stationary(rng, q.shape) * (500.0 if step == 70 else 1.0))
            monitor.observe(loss=float(step ** -0.5))
            opt.step()
    markdown = build_report(tmp_path)
    for image in ("loss_spikes.png", "spikes_by_layer_type.png", "spikes_heatmap.png", "gss_histogram.png"):
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({image})" in markdown.read_text()
    summary = summarize(load_records(tmp_path))
    assert summary["resets"] == [30, 60] and summary["spikes_per_step"][70]
    assert p.grad is not None


def test_flush_is_periodic_and_records_are_json_lines(tmp_path):
    named = _named({"w": (3,)})
    monitor = SpikeMonitor(named, tmp_path, flush_every=5)
    for _ in range(7):
        named[0][1].grad = torch.ones(3)
        monitor.observe()
    lines = (tmp_path / "spikes.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines].count("tensor") == 5
    monitor.close()
    lines = (tmp_path / "spikes.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines].count("tensor") == 7


def test_layer_types_and_depths_from_names():
    assert layer_type("layers.3.attn.q.weight") == "attention" and depth("layers.3.attn.q.weight") == 3
    assert layer_type("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert layer_type("transformer.h.2.ln_1.weight") == "norm" and depth("transformer.h.2.ln_1.weight") == 2
    assert layer_type("embed.weight") == "embedding" and layer_type("lm_head.weight") == "head"
    assert depth("norm.weight") is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(threshold=0), "Invalid threshold value: 0"),
    (dict(flush_every=0), "Invalid flush_every value: 0"),
    (dict(mode="coordinate"), "Invalid mode value for w: 'coordinate'"),
])
def test_bad_monitor_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpikeMonitor(_named({"w": (3,)}), tmp_path, **kwargs)


def test_tensorboard_scalars_are_written(tmp_path):
    """Optional extra: skipped where the tensorboard package is not installed."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    named = _named({"layers.0.mlp.up.weight": (4,)})
    with SpikeMonitor(named, tmp_path, tensorboard=True, flush_every=2) as monitor:
        for step in range(4):
            named[0][1].grad = torch.ones(4) * (step + 1)
            monitor.observe(loss=1.0 / (step + 1))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "loss" in tags and "spikes/mlp/layers.0.mlp.up.weight" in tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_element_and_tensor_modes_mix_in_one_monitor_and_report(tmp_path):
    """The README's per-tensor mode dict: element-mode records carry the GSS fields, tensor-mode records only
    the norm statistics, both survive the flush (rows of different lengths), and the report reads both."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with SpikeMonitor([("a", a), ("b", b)], tmp_path, mode={"b": "tensor"}, flush_every=2) as monitor:
        for step in range(1, 6):
            a.grad = torch.full((3,), float(step))
            b.grad = torch.full((3,), 2.0 * step)
            monitor.observe(loss=1.0 / step)
    records = _records(tmp_path)
    by_name = {name: [r for r in records if r["name"] == name] for name in ("a", "b")}
    assert [r["step"] for r in by_name["a"]] == [r["step"] for r in by_name["b"]] == [1, 2, 3, 4, 5]
    assert {"spikes", "max_gss", "spike_fraction"} <= set(by_name["a"][0]) and "spikes" not in by_name["b"][0]
    assert by_name["a"][2]["max_gss"] == pytest.approx(3 / (6 / 3))  # |g_3| over the mean of 1, 2, 3
    assert by_name["b"][4]["grad_norm"] == pytest.approx(10.0 * 3 ** 0.5)
    build_report(tmp_path)
    assert set(summarize(load_records(tmp_path))["by_tensor"]) == {"a"}


def test_a_late_first_appearance_is_a_spike_unless_excluded(tmp_path):
    """A coordinate whose first non-zero gradient comes at observation 60 has GSS = 60 there: a spike by the
    paper's definition (and nullified), unless ``count_first_appearances=False``. A real spike of an
    established coordinate is counted either way."""
    found = {}
    for count_first in (True, False):
        p = torch.nn.Parameter(torch.zeros(2))
        out = tmp_path / str(count_first)
        with SpikeMonitor([("w", p)], out, flush_every=100, nullify=True,
                          count_first_appearances=count_first) as monitor:
            for step in range(1, 71):
                g = torch.tensor([1.0, 0.0 if step < 60 else 1.0])
                if step == 65:
                    g[0] = 1000.0
                p.grad = g
                monitor.observe()
                if step == 60:
                    nullified_at_60 = p.grad[1].item() == 0.0
        records = {r["step"]: r for r in _records(out)}
        found[count_first] = (records[60]["spikes"], records[60]["max_gss"], nullified_at_60, records[65]["spikes"])
    assert found[True] == (1, pytest.approx(60.0), True, 1)
    assert found[False] == (0, pytest.approx(60.0), False, 1)


def test_state_dict_continues_the_scores_and_drops_records_past_the_checkpoint(tmp_path):
    """A monitor stopped after step 55 whose state was saved at step 40 (flushed there), replaced by a new one
    that loads that state, writes exactly the records and scores of a monitor that ran 1…70 without a break."""
    rng = np.random.default_rng(7)
    grads = [(rng.standard_normal((4, 5)) * rng.lognormal(0, 2, (4, 5))).astype(np.float32) for _ in range(70)]
    p = torch.nn.Parameter(torch.zeros(4, 5))
    mode = {"norm.weight": "tensor"}

    def monitor_for(out):
        return SpikeMonitor([("w", p), ("norm.weight", q)], out, threshold=4.0, flush_every=15, mode=mode)

    q = torch.nn.Parameter(torch.zeros(3))

    def observe(monitor, step):
        p.grad = torch.from_numpy(grads[step - 1])
        q.grad = torch.full((3,), float(step % 7))
        monitor.observe(step=step, loss=float(step))

    with monitor_for(tmp_path / "whole") as whole:
        for step in range(1, 71):
            observe(whole, step)
            if step == 40:
                whole.flush()
    interrupted = monitor_for(tmp_path / "resumed")
    for step in range(1, 56):
        observe(interrupted, step)
        if step == 40:
            interrupted.flush()
            saved = torch.load(_roundtrip(interrupted.state_dict(), tmp_path), weights_only=True)
    interrupted.flush()  # records past the checkpoint reach the file before the "kill"
    interrupted._file.write('{"kind": "tensor", "st')  # a line cut short
    interrupted._file.close()
    with monitor_for(tmp_path / "resumed") as resumed:
        resumed.load_state_dict(saved)
        for step in range(41, 71):
            observe(resumed, step)
    assert load_records(tmp_path / "resumed") == load_records(tmp_path / "whole")


def _roundtrip(state, tmp_path):
    path = tmp_path / "monitor.pt"
    torch.save(state, path)
    return path


def test_loss_spike_rule_flags_a_jump_over_noise_once():
    """The rule on a noisy, slowly falling loss: nothing is flagged until the planted jump of 0.5 nats at step
    120 (held for 3 steps, reported once, at its first step); a rise smaller than 0.05 nats is never a spike
    however quiet the history."""
    from spamopt.spikes.report import loss_spikes

    rng = np.random.default_rng(0)
    losses = [(s, 5.0 - 0.002 * s + 0.01 * rng.standard_normal()) for s in range(1, 201)]
    losses[119:122] = [(s, v + 0.5) for s, v in losses[119:122]]
    assert [e["step"] for e in loss_spikes(losses)] == [120]
    flat = [(s, 3.0) for s in range(1, 80)] + [(80, 3.04)]
    assert loss_spikes(flat) == []


def test_largest_loss_rise_is_the_rules_measure_in_robust_deviations():
    """``largest_loss_rise``: on Gaussian noise of σ = 0.01 it stays near the few σ that 150 draws reach (below
    the rule's 6); a planted 0.2-nat jump gives the jump over the noise's robust σ, computed here with numpy
    from the 50 losses before it."""
    from spamopt.spikes.report import largest_loss_rise

    rng = np.random.default_rng(1)
    losses = [(s, 5.0 + 0.01 * rng.standard_normal()) for s in range(1, 201)]
    assert 2.0 < largest_loss_rise(losses) < 6.0
    losses[149] = (150, losses[149][1] + 0.2)
    history = np.array([v for _, v in losses[99:149]])
    median = np.median(history)
    oracle = (losses[149][1] - median) / (1.4826 * np.median(np.abs(history - median)))
    assert largest_loss_rise(losses) == pytest.approx(oracle)
    assert largest_loss_rise(losses[:50]) == 0.0


def test_report_traces_a_loss_spike_to_the_layer_whose_gradient_spiked_first(tmp_path):
    """A gradient spike planted in one layer at step 90, then in another at step 91, and the loss jumping at
    step 92: the report's loss-spike section lists step 92, the first layer first (at step 90), then the
    second (at 91), and no other tensor (their gradient norms did not jump)."""
    rng = np.random.default_rng(1)
    named = _named(SHAPES)
    planted = {90: "layers.0.attn.q.weight", 91: "head.weight"}
    with SpikeMonitor(named, tmp_path, flush_every=10) as monitor:
        for step in range(1, 121):
            for name, p in named:
                scale = 1000.0 if planted.get(step) == name else 1.0
                p.grad = torch.from_numpy(_stationary(rng, p.shape) * scale)
            loss = 4.0 - 0.001 * step + 0.01 * rng.standard_normal() + (1.0 if step == 92 else 0.0)
            monitor.observe(loss=loss)
    summary = summarize(load_records(tmp_path))
    assert [e["step"] for e in summary["loss_spikes"]] == [92]
    text = build_report(tmp_path).read_text()
    section = text[text.index("## Loss spikes"):]
    assert "### Step 92" in section
    rows = [line for line in section.splitlines() if line.startswith("| 9")]
    assert len(rows) == 2, rows
    assert rows[0].startswith("| 90 | `layers.0.attn.q.weight`") and rows[1].startswith("| 91 | `head.weight`")


def test_update_forensics_against_an_oracle(tmp_path):
    """``updates=True``: the update RMS is ‖θ_after − θ_before‖ / √n (SGD: lr·‖g‖/√n, computed here), and the
    moment norms equal ``torch.linalg.vector_norm`` of Adam's own ``exp_avg`` / ``exp_avg_sq``; an optimizer
    without moments records None for them. Monitoring changes nothing the optimizer does."""
    rng = np.random.default_rng(3)
    for name_of_optimizer in ("sgd", "adam"):
        named = _named(SHAPES)
        params = [p for _, p in named]
        optimizer = (torch.optim.SGD(params, lr=0.1) if name_of_optimizer == "sgd"
                     else torch.optim.Adam(params, lr=0.01))
        expected = []
        run_dir = tmp_path / name_of_optimizer
        with SpikeMonitor(named, run_dir, optimizer=optimizer, updates=True) as monitor:
            for step in range(1, 4):
                for _, p in named:
                    p.grad = torch.from_numpy(_stationary(rng, p.shape))
                monitor.observe()
                before = {n: p.detach().clone() for n, p in named}
                optimizer.step()
                for n, p in named:
                    state = optimizer.state[p]
                    expected.append((step, n, float((p.detach() - before[n]).norm() / p.numel() ** 0.5),
                                     float(torch.linalg.vector_norm(state["exp_avg"])) if state else None,
                                     float(torch.linalg.vector_norm(state["exp_avg_sq"])) if state else None))
                    if name_of_optimizer == "sgd":
                        oracle = 0.1 * float(p.grad.norm()) / p.numel() ** 0.5
                        assert expected[-1][2] == pytest.approx(oracle, rel=1e-5)
        got = [(r["step"], r["name"], r["update_rms"], r["exp_avg_norm"], r["exp_avg_sq_norm"])
               for r in _records(run_dir, "update")]
        assert len(got) == len(expected) == 9
        for row, want in zip(got, expected):
            assert row[:2] == want[:2]
            for value, oracle in zip(row[2:], want[2:]):
                assert value == pytest.approx(oracle, rel=1e-6) if oracle is not None else value is None


def test_update_forensics_need_the_optimizer(tmp_path):
    with pytest.raises(ValueError, match="updates"):
        SpikeMonitor(_named(SHAPES), tmp_path, updates=True)


def test_census_rates_count_planted_spikes_per_million_coordinate_steps(tmp_path):
    """Spikes planted in a block weight (2 in the attention q matrix, 1 in a norm weight) and in the head (3)
    over 100 steps of sign noise: ``census`` gives each layer type's count per million coordinate-steps
    (q: 48 coordinates, norm: 8, head: 32, observed each step), the block weights' rate over both, the
    largest attention logit passed as a signal, and NaN for a run that recorded none."""
    planted = {(85, "layers.0.attn.q.weight"): [(0, 1), (5, 7)], (88, "layers.0.attn_norm.weight"): [(2,)],
               (90, "head.weight"): [(1, 2), (3, 7), (0, 0)]}
    named = _observe_planted(tmp_path / "logits", planted,
                             signals=lambda step: {"max_attention_logit.layers.0": 3.0 + (step == 40) * 100.0})
    found = census(load_records(tmp_path / "logits"))
    observed = 100  # steps at which every coordinate is observed
    assert found["rates_per_million"]["attention"] == pytest.approx(1e6 * 2 / (48 * observed))
    assert found["rates_per_million"]["norm"] == pytest.approx(1e6 * 1 / (8 * observed))
    assert found["rates_per_million"]["head"] == pytest.approx(1e6 * 3 / (32 * observed))
    assert found["block_spikes_per_million"] == pytest.approx(1e6 * 3 / ((48 + 8) * observed))
    assert found["max_block_gss"] > 50
    assert found["max_attention_logit"] == 103.0
    assert found["clipped"] is None and found["clipped_by_type"] is None  # no SPAM: not counted, not 0
    with SpikeMonitor(named, tmp_path / "plain") as monitor:
        for _ in range(3):
            for _, p in named:
                p.grad = torch.ones_like(p)
            monitor.observe()
    assert np.isnan(census(load_records(tmp_path / "plain"))["max_attention_logit"])


def test_signals_are_recorded_per_step(tmp_path):
    """Named scalars passed to ``observe`` (tensors or numbers) come back per step, in one flush."""
    named = _named(SHAPES)
    with SpikeMonitor(named, tmp_path, flush_every=100) as monitor:
        for step in range(1, 4):
            for _, p in named:
                p.grad = torch.ones_like(p)
            monitor.observe(signals={"output_log_z": torch.tensor(2.0 * step), "max_attention_logit.layers.0": step})
    records = _records(tmp_path, "signals")
    assert [r["values"] for r in records] == [
        {"output_log_z": 2.0 * s, "max_attention_logit.layers.0": float(s)} for s in (1, 2, 3)]


def test_report_lists_the_update_and_logit_jumps_before_a_loss_spike(tmp_path):
    """Forensics planted before a loss spike at step 92: one layer's update jumps at step 89 (its learning rate
    multiplied), an attention-logit signal at step 90, and nothing else moves. The loss-spike section's second
    table lists the update first (89), then the logit (90), and nothing else; the figure is written."""
    rng = np.random.default_rng(4)
    named = _named(SHAPES)
    params = [p for _, p in named]
    optimizer = torch.optim.SGD(params, lr=0.01)
    with SpikeMonitor(named, tmp_path, flush_every=10, optimizer=optimizer, updates=True) as monitor:
        for step in range(1, 121):
            for _, p in named:
                p.grad = torch.from_numpy(_stationary(rng, p.shape))
            logit = 5.0 + 0.01 * rng.standard_normal() + (20.0 if step == 90 else 0.0)
            loss = 4.0 - 0.001 * step + 0.01 * rng.standard_normal() + (1.0 if step == 92 else 0.0)
            monitor.observe(loss=loss, signals={"max_attention_logit.layers.0": logit})
            named[0][1].grad.mul_(100.0 if step == 89 else 1.0)  # after observe: the gradient record is unmoved
            optimizer.step()
    text = build_report(tmp_path).read_text()
    section = text[text.index("### Step 92"):]
    rows = [line for line in section.splitlines() if line.startswith("| 8") or line.startswith("| 9")]
    assert rows == [line for line in rows if "update RMS" in line or "signal" in line]
    assert len(rows) == 2, rows
    assert rows[0].startswith("| 89 | update RMS | `layers.0.attn.q.weight`")
    assert rows[1].startswith("| 90 | signal | `max_attention_logit.layers.0`")
    assert (tmp_path / "loss_spike_92.png").exists()
