"""Per-step gradient-spike statistics, accumulated on the device and written as JSONL every few steps."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..extras import require
from .layers import depth, layer_type

__all__ = ["SpikeMonitor", "GSS_HISTOGRAM_EDGES", "RECORDS_FILE"]

RECORDS_FILE = "spikes.jsonl"
# log10(GSS) bins: coordinates with GSS <= 1e-3 (zeros included) land in the first bin.
_LOG_LOW, _LOG_HIGH, _BINS = -3.0, 5.0, 64
GSS_HISTOGRAM_EDGES = [10 ** (_LOG_LOW + i * (_LOG_HIGH - _LOG_LOW) / _BINS) for i in range(_BINS + 1)]

_ELEMENT_FIELDS = ("grad_norm", "max_abs", "norm_z", "max_abs_z", "spikes", "max_gss", "spike_fraction")
_TENSOR_FIELDS = _ELEMENT_FIELDS[:4]
_UPDATE_FIELDS = ("update_rms", "exp_avg_norm", "exp_avg_sq_norm")

Mode = str  # "element" or "tensor"


class SpikeMonitor:
    r"""Watches the gradients of named parameters for spikes, step by step.

    Call :meth:`observe` after ``backward()`` and before ``optimizer.step()``. Per parameter tensor it records:

    * ``"tensor"`` mode (cheap, for long runs): gradient norm ``‖g‖``, ``max|g|``, and their z-scores against
      the running mean and standard deviation of earlier steps (Welford; 0 until two steps are known).
    * ``"element"`` mode (default) adds the paper's Gradient Spike Score per coordinate,
      ``GSS_t = |g_t| / ((1/n) Σ_{j≤t} |g_j|)``, the running mean over the ``n`` steps so far *including*
      the current one; a coordinate spikes when ``GSS > threshold`` (50 in the paper). It records the spike
      count, the largest GSS and the spike fraction, and histograms ``log10 GSS`` over all coordinates. It
      costs one fp32 buffer per monitored parameter (the running sum of ``|g|``). Since ``GSS ≤ n``, no spike
      can be seen in the first ``threshold`` steps.

    ``mode`` is one string for all tensors, a ``{name: mode}`` dict (others default to ``"element"``) or a
    callable ``(name, param) -> mode``; one monitor may mix both modes. ``nullify=True`` is the paper's
    intervention: coordinates whose GSS exceeds the threshold are zeroed **in ``p.grad``** before the optimizer
    sees them (element mode only).

    First appearances: a coordinate whose first non-zero gradient comes at the ``n``-th observation has
    ``GSS = n`` then (its running mean is that one value over ``n`` steps), so after ``threshold`` steps it
    counts as a spike — typically the embedding rows of tokens first seen late — and ``nullify`` zeroes it.
    ``count_first_appearances=False`` leaves such coordinates out of spike counts (and out of ``nullify``);
    their GSS still enters ``max_gss`` and the histogram.

    Steps are numbered from 1 (``observe()`` without ``step`` counts them), as the training metrics are. For a
    resumable run, save :meth:`state_dict` with the checkpoint (after :meth:`flush`, so the file holds every
    record up to that step) and call :meth:`load_state_dict` on resume: records after the checkpoint's step are
    dropped from ``spikes.jsonl`` and the running statistics continue as if never interrupted.

    Statistics stay on the device and are copied to the host every ``flush_every`` steps, so monitoring adds
    no host synchronisation per step. With ``optimizer`` given, the optimizer's own per-step statistics
    (SPAM: coordinates clipped per tensor, resets, warmup multiplier, skipped steps) are recorded too, through a
    step post-hook. Records go to ``run_dir/spikes.jsonl``; ``tensorboard=True`` also writes scalars.

    Forensics, as practitioners debug a loss spike: ``updates=True`` (needs ``optimizer``) records per tensor
    and step the update's RMS, ``‖Δθ‖ / √n`` with ``Δθ`` what the optimizer step changed, and the norms of the
    optimizer's ``exp_avg`` and ``exp_avg_sq`` state where it has them (it keeps a copy of the parameters
    across each step to do so). ``observe(signals=...)`` records named scalars of the step, such as the
    largest attention logit per layer or the output logits' mean log-sum-exp.
    """

    def __init__(
        self,
        model: nn.Module | Iterable[tuple[str, nn.Parameter]],
        run_dir: str | Path,
        *,
        mode: Mode | dict[str, Mode] | Callable[[str, Tensor], Mode] = "element",
        threshold: float = 50.0,
        flush_every: int = 50,
        nullify: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        tensorboard: bool = False,
        count_first_appearances: bool = True,
        updates: bool = False,
    ) -> None:
        if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
            raise ValueError(f"Invalid threshold value: {threshold!r} (must be a finite number > 0)")
        if not (isinstance(flush_every, int) and flush_every >= 1):
            raise ValueError(f"Invalid flush_every value: {flush_every!r} (must be an integer >= 1)")
        named = list(model.named_parameters() if isinstance(model, nn.Module) else model)
        self.names = [n for n, p in named if p.requires_grad]
        self.params = [p for _, p in named if p.requires_grad]
        self.modes = [self._mode_of(mode, n, p) for n, p in zip(self.names, self.params)]
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self.threshold, self.flush_every, self.nullify = float(threshold), flush_every, nullify
        self.count_first_appearances = count_first_appearances
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (self.run_dir / RECORDS_FILE).open("a", encoding="utf-8")
        self._abs_sums: dict[int, Tensor] = {}
        self._counts = [0] * len(self.params)  # steps observed per tensor: a host counter, no sync
        self._welford: dict[int, tuple[int, Tensor, Tensor]] = {}
        self._pending: list[tuple[str, int, Any]] = []
        self._histogram: Tensor | None = None
        self._histogram_from: int | None = None
        self.step = 0
        if updates and optimizer is None:
            raise ValueError("Invalid updates value: True (update forensics need the optimizer: pass optimizer=)")
        self._optimizer = optimizer
        self._hooks: list[Any] = []
        self._before: dict[int, Tensor] = {}
        if optimizer is not None:
            if hasattr(optimizer, "record_statistics"):
                optimizer.record_statistics = True
            if updates:
                self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self._tensorboard = self._open_tensorboard() if tensorboard else None
        self._write({"kind": "meta", "threshold": self.threshold, "tensors": [
            {"name": n, "layer_type": layer_type(n), "depth": depth(n), "numel": p.numel(), "mode": m}
            for n, p, m in zip(self.names, self.params, self.modes)
        ], "histogram_edges": GSS_HISTOGRAM_EDGES})

    @staticmethod
    def _mode_of(mode: Any, name: str, param: Tensor) -> Mode:
        chosen = mode(name, param) if callable(mode) else mode.get(name, "element") if isinstance(mode, dict) else mode
        if chosen not in ("element", "tensor"):
            raise ValueError(f"Invalid mode value for {name}: {chosen!r} (must be 'element' or 'tensor')")
        return chosen

    def _open_tensorboard(self):
        board = require("torch.utils.tensorboard", "tensorboard", "tensorboard")  # an optional extra
        return board.SummaryWriter(str(self.run_dir / "tensorboard"))

    # ------------------------------------------------------------------------------------ per step

    @torch.no_grad()
    def observe(self, step: int | None = None, loss: Tensor | float | None = None,
                signals: dict[str, Tensor | float] | None = None) -> None:
        """Record this step's gradients (and optionally the loss and named scalar ``signals``, as tensors on any
        device or numbers); flush every ``flush_every`` steps."""
        self.step = self.step + 1 if step is None else step
        if self._histogram_from is None:
            self._histogram_from = self.step
        if loss is not None:
            self._pending.append(("loss", self.step, loss.detach() if isinstance(loss, Tensor) else loss))
        if signals:
            home = self.params[0].device if self.params else torch.device("cpu")
            values = torch.stack([torch.as_tensor(v).detach().to(home, torch.float32).reshape(())
                                  for v in signals.values()])
            self._pending.append(("signals", self.step, (list(signals), values)))
        for index, (param, mode) in enumerate(zip(self.params, self.modes)):
            grad = param.grad
            if grad is None:
                continue
            g = torch.view_as_real(grad) if grad.is_complex() else grad
            magnitude = g.abs().float()
            self._counts[index] += 1
            norm, max_abs = magnitude.norm(), magnitude.max() if magnitude.numel() else magnitude.sum()
            row = [norm, max_abs, *self._z_scores(index, torch.stack([norm, max_abs]))]
            if mode == "element":
                row += self._element_statistics(index, g, magnitude)
            self._pending.append(("tensor", self.step, (index, torch.stack(row))))
        if self.step % self.flush_every == 0:
            self.flush()

    def _z_scores(self, index: int, values: Tensor) -> list[Tensor]:
        count, mean, m2 = self._welford.get(index, (0, torch.zeros_like(values), torch.zeros_like(values)))
        if count >= 2:
            z = (values - mean) / (m2 / (count - 1)).sqrt().clamp_min(1e-30)
        else:
            z = torch.zeros_like(values)
        delta = values - mean
        mean = mean + delta / (count + 1)
        self._welford[index] = (count + 1, mean, m2 + delta * (values - mean))
        return list(z.unbind(0))

    def _element_statistics(self, index: int, grad: Tensor, magnitude: Tensor) -> list[Tensor]:
        total = self._abs_sums.get(index)
        if total is None:
            total = self._abs_sums[index] = torch.zeros_like(magnitude)
        total.add_(magnitude)
        first = None if self.count_first_appearances else (total == magnitude) & (magnitude > 0)
        gss = magnitude.mul_(self._counts[index]).div_(total).nan_to_num_(0.0)  # 0/0 where |g| was always 0
        spikes = gss > self.threshold
        if first is not None:  # earlier gradients were all zero: no history to call this a spike against
            spikes &= ~first
        count = spikes.sum()
        if self.nullify:
            grad.masked_fill_(spikes, 0.0)
        histogram = torch.histc(gss.clamp(min=10**_LOG_LOW).log10_(), bins=_BINS, min=_LOG_LOW, max=_LOG_HIGH)
        self._histogram = histogram if self._histogram is None else self._histogram.add_(histogram)
        max_gss = gss.max() if gss.numel() else gss.sum()
        return [count.float(), max_gss, count.float() / max(gss.numel(), 1)]

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._before = {i: p.detach().clone() for i, p in enumerate(self.params) if p.grad is not None}

    def _record_updates(self, optimizer: torch.optim.Optimizer) -> None:
        """Update RMS and moment norms of the tensors stepped just now (NaN for state the optimizer lacks)."""
        missing = torch.tensor(math.nan)
        for index, before in self._before.items():
            param = self.params[index]
            change = (param.detach() - before).float()
            rms = change.norm() / math.sqrt(max(change.numel(), 1))
            state = optimizer.state.get(param, {})
            norms = [state[key].detach().float().norm() if isinstance(state.get(key), Tensor)
                     else missing.to(rms.device) for key in ("exp_avg", "exp_avg_sq")]
            self._pending.append(("update", self.step, (index, torch.stack([rms, *norms]))))
        self._before = {}

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self._before:
            self._record_updates(optimizer)
        statistics = getattr(optimizer, "last_statistics", None)
        if not statistics:
            return
        clipped = {self._position[id(p)]: c for p, c in statistics["clipped"].items() if id(p) in self._position}
        self._pending.append(("optimizer", self.step, (clipped, statistics)))

    # ------------------------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """The running statistics (tensors and numbers, keyed by parameter name) and the step: what a checkpoint
        needs to continue the scores exactly. Call :meth:`flush` first so the file is complete up to ``step``."""
        return {
            "step": self.step,
            "counts": {self.names[i]: c for i, c in enumerate(self._counts) if c},
            "abs_sums": {self.names[i]: s for i, s in self._abs_sums.items()},
            "welford": {self.names[i]: {"count": c, "mean": m, "m2": m2} for i, (c, m, m2) in self._welford.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: restore the statistics and drop the records written after its step
        (and this instance's second ``meta`` record) from ``spikes.jsonl``."""
        index = {name: i for i, name in enumerate(self.names)}
        self.flush()
        self.step = state["step"]
        self._counts = [state["counts"].get(name, 0) for name in self.names]
        self._abs_sums = {index[n]: s.to(self.params[index[n]].device) for n, s in state["abs_sums"].items()}
        self._welford = {index[n]: (w["count"], w["mean"].to(self.params[index[n]].device),
                                    w["m2"].to(self.params[index[n]].device)) for n, w in state["welford"].items()}
        self._file.close()
        path = self.run_dir / RECORDS_FILE
        kept, seen_meta = [], False
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record["kind"] == "meta":
                if seen_meta:
                    continue
                seen_meta = True
            elif record.get("to_step", record.get("step", 0)) > self.step:
                continue
            kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        self._file = path.open("a", encoding="utf-8")

    # ---------------------------------------------------------------------------------------- I/O

    def flush(self) -> None:
        """Copy the pending statistics to the host (one transfer) and append them to the JSONL file."""
        if not self._pending and self._histogram is None:
            return
        rows = [item[1].to("cpu" if not self.params else self.params[0].device)
                for kind, _, item in self._pending if kind in ("tensor", "update", "signals")]
        # Rows differ in length (element or tensor mode, updates, signals): one flat transfer, cut per record.
        values = iter(torch.cat(rows).cpu().tolist() if rows else [])
        for kind, step, item in self._pending:
            if kind == "loss":
                self._write({"kind": "loss", "step": step, "loss": float(item)})
            elif kind == "update":
                record = {"kind": "update", "step": step, "name": self.names[item[0]]}
                for field in _UPDATE_FIELDS:
                    value = next(values)
                    record[field] = None if math.isnan(value) else value
                self._write(record)
            elif kind == "signals":
                self._write({"kind": "signals", "step": step,
                             "values": {name: next(values) for name in item[0]}})
            elif kind == "tensor":
                index = item[0]
                fields = _ELEMENT_FIELDS if self.modes[index] == "element" else _TENSOR_FIELDS
                record = {"kind": "tensor", "step": step, "name": self.names[index]}
                record.update((name, next(values)) for name in fields)
                if "spikes" in record:
                    record["spikes"] = int(record["spikes"])
                self._write(record)
            else:
                clipped, statistics = item
                skipped = statistics["skipped"]
                self._write({
                    "kind": "optimizer", "step": step,
                    "clipped": {self.names[i]: int(c) for i, c in clipped.items()},
                    "reset": statistics["reset"], "warmup_multiplier": statistics["warmup_multiplier"],
                    "skipped": bool(skipped) if skipped is not None else False,
                })
        if self._histogram is not None:
            self._write({"kind": "gss_histogram", "from_step": self._histogram_from, "to_step": self.step,
                         "counts": [int(c) for c in self._histogram.cpu().tolist()]})
            self._histogram = None
        self._histogram_from = None
        if self._tensorboard is not None:
            self._tensorboard.flush()
        self._pending = []
        self._file.flush()

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self._tensorboard is None or record["kind"] not in ("loss", "tensor"):
            return
        if record["kind"] == "loss":
            self._tensorboard.add_scalar("loss", record["loss"], record["step"])
            return
        self._tensorboard.add_scalar(f"grad_norm/{record['name']}", record["grad_norm"], record["step"])
        if "spikes" in record:
            kind = layer_type(record["name"])
            self._tensorboard.add_scalar(f"spikes/{kind}/{record['name']}", record["spikes"], record["step"])

    def close(self) -> None:
        """Flush, detach from the optimizer (and stop its statistics) and close the files."""
        self.flush()
        if self._hooks:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            if hasattr(self._optimizer, "record_statistics"):  # stop paying for clip counts
                self._optimizer.record_statistics = False
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._file.close()

    def __enter__(self) -> SpikeMonitor:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
