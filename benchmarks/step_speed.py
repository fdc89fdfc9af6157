"""Optimizer-step time of SPAM against torch.optim.AdamW on LLaMA-shaped parameter sets.

Every implementation steps the same parameters and gradients in one process, side by side; the table
reports milliseconds per step, the ratio to torch's fused AdamW (and its foreach path) and the ratio to the
memory-bandwidth floor: an fp32 Adam-family step reads p, g, m, v and writes p, m, v, 28 bytes per
parameter, timed against the copy bandwidth measured in the same run. Writes JSON. The process keeps freed
memory as every ``spamopt`` command does (``keep_freed_memory``; ``SPAMOPT_ALLOCATOR=system`` for glibc's
default, under which a row's time depends on what the rows before it freed: ``allocator_speed.py``).

SPAM's default ``skip_nonfinite=True`` reads every gradient once more (a device-side check that all are
finite, 4 bytes per parameter: a 32-byte floor); ``*_noskip`` rows turn it off and are the like-for-like
comparison with torch's AdamW, which does no such check; the check alone is timed too
(``nonfinite_check_ms``). ``pytorch_optimizer_spam`` (the packaged SPAM of pytorch-optimizer,
``pip install pytorch-optimizer``) is measured when installed. ``--num-warps`` repeats the
fused rows for each Triton warp count. ``*_compiled*`` rows are ``compiled=True``; their first step
(``first_step_s``, with the state's creation) includes compiling the kernel, cached on disk for later runs
(clear ``/tmp/torchinductor_$USER`` to measure a cold compile). ``*_positions`` keeps the sparse matrices'
kept positions between steps (``keep_positions=True``: 4 bytes per kept coordinate more state). On the CPU
the compiled SPAM rows step their dense tensors on the native loops (:mod:`spamopt.optim.native`) and
the check runs there too; ``*_torch_kernels*`` and ``stable_spam_compiled_aminmax`` are the same optimizers
with the loops switched off (``SPAMOPT_NATIVE=0``: one torch.compile kernel per tensor, ``aminmax``), and
``nonfinite_check_aminmax_ms`` the check that way.

On the CPU the rows are measured interleaved: every optimizer is created at once and they step the same
parameters in turn, round after round (the check alone is one more row of each round), so a drift in the
shared machine's speed during the run, 20-40 % within minutes, touches every row alike and the ratios hold.
On CUDA the rows run one after another from the same parameters and fresh state, so that each row's peak
memory can be measured and the 1B states need not fit together (``"order"`` in the JSON says which).

    python benchmarks/step_speed.py                              # CPU, LLaMA-60M shapes
    python benchmarks/step_speed.py --device cuda --models 350m 1b --num-warps 4 8 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from spamopt import SPAM, StableSPAM
from spamopt.experiments.harness.allocator import keep_freed_memory
from spamopt.experiments.lm.config import CONFIGS, is_block_matrix
from spamopt.optim import compiled, fused, native
from spamopt.optim.base import all_finite

FLOOR_BYTES_PER_PARAMETER = 28  # fp32: read p, g, m, v; write p, m, v


def _params(model: str, device: str) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    named = []
    for name, shape in CONFIGS[model].parameter_shapes().items():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.02).to(device))
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3).to(device)
        named.append((name, p))
    return named


class _TorchKernelsOnly:
    """Steps ``opt`` with the native CPU loops switched off (``SPAMOPT_NATIVE=0``): its compiled step on the
    torch.compile kernels, one call per tensor, and its non-finite check on ``aminmax``, as before the loops."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def __getattr__(self, name: str):
        return getattr(self.opt, name)

    def step(self) -> None:
        before = os.environ.get("SPAMOPT_NATIVE")
        os.environ["SPAMOPT_NATIVE"] = "0"
        try:
            self.opt.step()
        finally:
            if before is None:
                del os.environ["SPAMOPT_NATIVE"]
            else:
                os.environ["SPAMOPT_NATIVE"] = before


def _fused_spam(groups, options: dict, warps: int) -> SPAM:
    opt = SPAM(groups, lr=1e-3, fused=True, clip_delay=0, **options)
    opt.fused_num_warps = warps
    return opt


def _candidates(named, device: str, num_warps: list[int]) -> dict:
    """Name → optimizer factory (the fused rows once per warp count)."""
    params = [p for _, p in named]
    # the reference puts attention and MLP matrices in the density group
    sparse = [p for n, p in named if is_block_matrix(n, p.shape)]
    dense = [p for n, p in named if not is_block_matrix(n, p.shape)]

    # New group dicts for every optimizer: torch.optim writes its defaults into the dicts it is given, so a
    # second optimizer made from the same dicts would take the first one's implementation flags (foreach=True
    # over its own compiled=True or fused=True) and time the wrong implementation under its name.
    def sparse_groups() -> list[dict]:
        return [{"params": sparse, "density": 0.25}, {"params": dense}]

    def all_matrices() -> list[dict]:
        return [{"params": [p for p in params if p.dim() == 2], "density": 0.25},
                {"params": [p for p in params if p.dim() != 2]}]

    candidates = {
        "adamw_foreach": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True),
        "adamw_fused": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True),
        "spam_forloop": lambda: SPAM(params, lr=1e-3, foreach=False, clip_delay=0),
        "spam_foreach": lambda: SPAM(params, lr=1e-3, foreach=True, clip_delay=0),
        "spam_sparse25_foreach": lambda: SPAM(sparse_groups(), lr=1e-3, foreach=True, clip_delay=0),
        "stable_spam_forloop": lambda: StableSPAM(params, lr=1e-3, foreach=False),
        "stable_spam_foreach": lambda: StableSPAM(params, lr=1e-3, foreach=True),
    }
    try:
        import pytorch_optimizer
    except ImportError:
        pass
    else:  # its clip delay is called grad_accu_steps
        candidates["pytorch_optimizer_spam"] = lambda: pytorch_optimizer.SPAM(params, lr=1e-3, grad_accu_steps=0)
    if compiled.compiled_available(device):
        candidates.update({
            "spam_compiled": lambda: SPAM(params, lr=1e-3, compiled=True, clip_delay=0),
            "spam_compiled_noskip": lambda: SPAM(params, lr=1e-3, compiled=True, clip_delay=0, skip_nonfinite=False),
            "spam_sparse25_compiled": lambda: SPAM(sparse_groups(), lr=1e-3, compiled=True, clip_delay=0),
            "spam_sparse25_compiled_positions": lambda: SPAM(sparse_groups(), lr=1e-3, compiled=True, clip_delay=0,
                                                             keep_positions=True),
            "stable_spam_compiled": lambda: StableSPAM(params, lr=1e-3, compiled=True),
        })
        if device == "cpu" and native.available():
            candidates.update({
                "spam_compiled_torch_kernels": lambda: _TorchKernelsOnly(
                    SPAM(params, lr=1e-3, compiled=True, clip_delay=0)),
                "spam_compiled_torch_kernels_noskip": lambda: _TorchKernelsOnly(
                    SPAM(params, lr=1e-3, compiled=True, clip_delay=0, skip_nonfinite=False)),
                "stable_spam_compiled_aminmax": lambda: _TorchKernelsOnly(StableSPAM(params, lr=1e-3, compiled=True)),
            })
    if device == "cuda" and fused.fused_available(torch.device(device)):
        variants = {"spam_fused": (lambda: params, {}),
                    "spam_fused_noskip": (lambda: params, {"skip_nonfinite": False}),
                    "spam_sparse25_fused": (sparse_groups, {}), "spam_sparse25_all_fused": (all_matrices, {})}
        for warps in num_warps:
            suffix = "" if len(num_warps) == 1 else f"_w{warps}"
            for name, (groups, options) in variants.items():
                candidates[name + suffix] = lambda g=groups, o=options, w=warps: _fused_spam(g(), o, w)
    return candidates


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """The optimizer's state, and the kept positions ``keep_positions=True`` holds beside it between steps."""
    per_parameter = [s for s in opt.state.values() if isinstance(s, dict)]  # pytorch-optimizer keeps counters too
    tensors = [t for s in per_parameter for t in s.values() if isinstance(t, torch.Tensor)]
    if isinstance(opt, _TorchKernelsOnly):
        opt = opt.opt
    if isinstance(opt, SPAM):
        tensors += opt.kept_positions().values()
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_bandwidth(device: str, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device copy (each byte read once and written once)."""
    size = (1 << 30) if device == "cuda" else (1 << 28)
    src = torch.empty(size // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size / statistics.median(times)


class _CheckOnly:
    """The part of every skipping step that only checks the gradients (SPAM's default skip_nonfinite=True),
    stepped like an optimizer so that it is timed in the same rounds as the rows."""

    def __init__(self, grads: list[torch.Tensor]) -> None:
        self.grads, self.state = grads, {}

    def step(self) -> None:
        all_finite(self.grads)


EDITS_GRADIENTS = {"pytorch_optimizer_spam"}  # rows whose step changes p.grad in place


def _restore(named, snapshot, weights: bool = True) -> None:
    for (_, p), (w, grad) in zip(named, snapshot):
        if weights:
            p.data.copy_(w)
        p.grad.copy_(grad)


def _timed_step(opt: torch.optim.Optimizer, device: str) -> float:
    start = time.perf_counter()
    opt.step()
    _sync(device)
    return time.perf_counter() - start


def _sequential(named, snapshot, candidates: dict, device: str, repeats: int, warmup: int) -> dict:
    """One optimizer at a time, from the same parameters and fresh state: on CUDA, where each row's peak
    memory is measured and the states of every row at 1B shapes would not fit together."""
    rows = {}
    for name, make in candidates.items():
        _restore(named, snapshot)
        opt = make()
        first_step_s = _timed_step(opt, device)  # creates the state; compiles the compiled rows' kernels
        for _ in range(warmup):
            opt.step()
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        times = [_timed_step(opt, device) for _ in range(repeats)]
        rows[name] = {"ms_per_step": 1e3 * statistics.median(times), "state_bytes": _state_bytes(opt),
                      "first_step_s": first_step_s}
        if device == "cuda":
            rows[name]["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        del opt
    return rows


def _interleaved(named, snapshot, candidates: dict, device: str, repeats: int, warmup: int) -> dict:
    """Every optimizer alive at once, stepping the same parameters in turn, one round after another: a change
    in the machine's speed during the run (on a shared CPU, 20-40 % within minutes) touches every row alike,
    so the ratios hold even when the absolute times drift."""
    def step(name: str, opt) -> float:
        elapsed = _timed_step(opt, device)
        if name in EDITS_GRADIENTS:
            _restore(named, snapshot, weights=False)
        return elapsed

    _restore(named, snapshot)
    optimizers, first_step_s = {}, {}
    for name, make in candidates.items():
        optimizers[name] = make()
        first_step_s[name] = step(name, optimizers[name])  # state, compilation
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_ in range(warmup + repeats):
        for name, opt in optimizers.items():
            elapsed = step(name, opt)
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: {"ms_per_step": 1e3 * statistics.median(times[name]), "state_bytes": _state_bytes(opt),
                   "first_step_s": first_step_s[name]} for name, opt in optimizers.items()}


def measure(model: str, device: str, repeats: int, warmup: int, bandwidth: float, num_warps: list[int]) -> dict:
    named = _params(model, device)
    numel = sum(p.numel() for _, p in named)
    snapshot = [(p.detach().clone(), p.grad.clone()) for _, p in named]
    order = _sequential if device == "cuda" else _interleaved
    candidates = _candidates(named, device, num_warps)
    candidates["nonfinite_check"] = lambda: _CheckOnly([p.grad for _, p in named])
    candidates["nonfinite_check_aminmax"] = lambda: _TorchKernelsOnly(_CheckOnly([p.grad for _, p in named]))
    rows = order(named, snapshot, candidates, device, repeats, warmup)
    check_ms = rows.pop("nonfinite_check")["ms_per_step"]
    aminmax_ms = rows.pop("nonfinite_check_aminmax")["ms_per_step"]
    floor_ms = 1e3 * FLOOR_BYTES_PER_PARAMETER * numel / bandwidth
    for row in rows.values():
        row["vs_floor"] = row["ms_per_step"] / floor_ms
        row["vs_adamw_fused"] = row["ms_per_step"] / rows["adamw_fused"]["ms_per_step"]
        row["vs_adamw_foreach"] = row["ms_per_step"] / rows["adamw_foreach"]["ms_per_step"]
    return {"model": model, "parameters": numel, "floor_ms": floor_ms, "order": order.__name__.lstrip("_"),
            "nonfinite_check_ms": check_ms, "nonfinite_check_aminmax_ms": aminmax_ms, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["60m"], choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-warps", type=int, nargs="+", default=[fused.NUM_WARPS],
                        help="warps per program for the fused rows (CUDA)")
    parser.add_argument("--out", type=Path, default=Path("results/step_speed.json"))
    args = parser.parse_args()

    if args.device == "cpu":
        device_name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    else:
        device_name = torch.cuda.get_device_name()
    memory_kept = keep_freed_memory()
    bandwidth = copy_bandwidth(args.device)
    report = {"device": device_name, "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth,
              "memory_kept": memory_kept, "runs": []}
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    for model in args.models:
        run = measure(model, args.device, args.repeats, args.warmup, bandwidth, args.num_warps)
        report["runs"].append(run)
        print(f"\nLLaMA-{model} shapes, {run['parameters'] / 1e6:.1f}M parameters, {device_name}, "
              f"28-byte floor {run['floor_ms']:.2f} ms; the non-finite check alone {run['nonfinite_check_ms']:.2f} ms "
              f"({run['nonfinite_check_aminmax_ms']:.2f} ms on aminmax)")
        print(f"{'implementation':<28}{'ms/step':>10}{'vs floor':>10}{'vs fused':>10}{'vs foreach':>12}"
              f"{'state MiB':>11}{'peak extra MiB':>16}{'first step s':>14}")
        for name, row in run["results"].items():
            print(f"{name:<28}{row['ms_per_step']:>10.2f}{row['vs_floor']:>10.2f}{row['vs_adamw_fused']:>10.2f}"
                  f"{row['vs_adamw_foreach']:>12.2f}{row['state_bytes'] / 2**20:>11.1f}"
                  f"{row.get('peak_extra_bytes', float('nan')) / 2**20:>16.1f}{row['first_step_s']:>14.2f}")
        # after every model, so that a run stopped at a time limit keeps the models it finished
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
