"""LLaMA pre-training on one process or under ``torchrun`` (DDP or FSDP2), read top to bottom.

The global batch (``batch_size`` sequences per optimizer step) is fixed whatever the number of processes:
step ``s`` uses samples ``s·B … s·B + B − 1`` of :class:`TokenWindows`, cut into ``accumulation × world``
micro-batches, so a run on N processes sees the same data as a run on one.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spamopt.extras import require

from ...optim import compiled
from ..harness import checkpoint
from ..harness.config import check_fields, option
from ..harness.memory import step_peak_memory
from ..harness.metrics import Metrics
from ..harness.optimizers import OptimizerSetup, build_optimizer, state_bytes
from ..harness.processes import Processes
from ..harness.quantize import SCHEMES, quantize_model
from ..harness.rundir import Start, begin, overwrite_option, plan, resume_option, write_summary
from ..harness.schedule import lr_multiplier
from .config import CONFIGS, is_block_matrix, optimizer_layout
from .data import DataConfig, TokenData, TokenWindows, prepare
from .model import Llama


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` in the run directory."""

    model: str = option("mini", "model size: a key of CONFIGS (tiny, mini, small, 60m, 130m, 350m, 1b)")
    data: str = option("stdlib", "stdlib | files, directories, globs (comma-separated) | c4 | c4:GLOB")
    vocab_size: int = option(8192, "size of the byte-level BPE trained on the train split")
    tokenizer: str | None = option(None, "a tokenizer.json to use instead of training a BPE")
    max_train_tokens: int | None = option(None, "stop tokenizing the train split there (required for c4)")
    cache_dir: str = option("runs/cache", "where tokenizers and token arrays are cached")
    seq_len: int = option(128, "tokens per training sequence")
    batch_size: int = option(16, "sequences per optimizer step, over all processes and micro-steps")
    micro_batch_size: int = option(0, "sequences per process per forward pass; 0: batch_size / processes")
    optimizer: str = option("spam", "adam, adamw, adam-clip, adafactor, lion, adam-mini, galore, zclip, spam, "
                                    "spam-sparse, stable-spam; NAME+adagn wraps NAME in AdaClip + AdaGN")
    optimizer_args: dict[str, Any] = option(dict, "JSON object passed to the optimizer's constructor")
    quant: str = option("none", "fake-quantise the block's linear layers: none, int4, int8, fp4 (the released "
                                "code's 9-level grid), e2m1, mxfp4 (these two need spamopt[quant])")
    lr: float = option(3e-3, "peak learning rate")
    weight_decay: float = option(0.0, "decoupled weight decay")
    steps: int = option(200, "optimizer steps")
    warmup_steps: int = option(20, "linear LR warmup steps, then cosine decay to min_lr_ratio × lr")
    min_lr_ratio: float = option(0.1, "final LR as a fraction of the peak")
    grad_clip: float = option(0.0, "global-norm gradient clipping for any optimizer; 0: off")
    qk_norm: bool = option(False, "RMSNorm on each head's queries and keys (qk-layernorm: bounds the attention "
                                  "logits, the known remedy for their growth at high learning rates)")
    compile: str = option("auto", "torch.compile each block: on, off, or auto (on where torch.compile can build "
                                  "kernels, a C++ compiler or Triton on CUDA, for models of 5M+ parameters); "
                                  "state dict keys and checkpoints are the same either way")
    z_loss: float = option(0.0, "train on cross-entropy + z_loss × mean(log Z)², Z the softmax normaliser "
                                "(PaLM's z-loss, against output-logit divergence); losses reported stay the "
                                "cross-entropy")
    pure_bf16: bool = option(False, "parameters, gradients and optimizer moments in bf16, without autocast, as "
                                    "the authors' training script (SPAM's and Stable-SPAM's statistics stay "
                                    "fp32; set fp32_moments in --optimizer-args to keep their moments fp32)")
    seed: int = option(0, "seed of the initial weights and the data order")
    eval_every: int = option(50, "validation every k steps (and at the end); 0: only at the end")
    eval_tokens: int = option(65_536, "validation tokens per evaluation")
    log_every: int = option(10, "steps per metrics record")
    checkpoint_every: int = option(50, "checkpoint every k steps (and at the end); 0: only at the end")
    run_dir: str = option("runs/train", "where config, metrics, checkpoint and summary go")
    resume: bool = resume_option()
    overwrite: bool = overwrite_option()
    parallel: str = option("ddp", "under torchrun: ddp or fsdp (FSDP2 fully_shard per block)")
    spikes: bool = option(False, "spike telemetry (SpikeMonitor, SPAM statistics) into run_dir/spikes")
    nullify_spikes: bool = option(False, "zero the gradient coordinates whose GSS exceeds 50 before each step, "
                                         "the paper's intervention (one process; implies --spikes)")
    forensics: bool = option(False, "spike forensics (implies --spikes): per tensor the update RMS and the "
                                    "optimizer's moment norms, per layer the largest attention logit, and the "
                                    "output logits' mean log-sum-exp, every step")
    tensorboard: bool = option(False, "also write TensorBoard scalars to run_dir/tensorboard")
    wandb: bool = option(False, "also log to Weights & Biases (offline unless WANDB_MODE says otherwise)")
    progress: bool = option(True, "progress bar with loss and tokens/s")

    # What --resume may change: the run's length (the cosine schedule follows the new one from there on),
    # cadences that neither read nor advance the RNG or the data (tested in tests/experiments/lm/test_faults.py),
    # DDP vs FSDP2 (full state dicts reshard; the same global batch either way), and compiling (the same
    # arithmetic in other kernels: it changes rounding, as another machine would, so a run whose compilation
    # fails can go on eager).
    FREE_ON_RESUME: ClassVar[frozenset[str]] = frozenset({"steps", "eval_every", "log_every", "checkpoint_every",
                                                          "cache_dir", "parallel", "compile"})

    def __post_init__(self) -> None:
        checks = {
            "model": (self.model in CONFIGS, f"one of {', '.join(CONFIGS)}"),
            "seq_len": (self.seq_len >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "micro_batch_size": (self.micro_batch_size >= 0, ">= 0"),
            "lr": (self.lr >= 0, ">= 0"),
            "steps": (self.steps >= 1, ">= 1"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            "grad_clip": (self.grad_clip >= 0, ">= 0"),
            "z_loss": (self.z_loss >= 0, ">= 0 (0: off)"),
            "eval_every": (self.eval_every >= 0, ">= 0 (0: only at the end)"),
            "checkpoint_every": (self.checkpoint_every >= 0, ">= 0 (0: only at the end)"),
            "log_every": (self.log_every >= 1, ">= 1"),
            "parallel": (self.parallel in ("ddp", "fsdp"), "'ddp' or 'fsdp'"),
            "quant": (self.quant in SCHEMES, f"one of {', '.join(SCHEMES)}"),
            "compile": (self.compile in ("on", "off", "auto"), "'on', 'off' or 'auto'"),
        }
        check_fields(self, checks)

    def data_config(self) -> DataConfig:
        return DataConfig(source=self.data, vocab_size=self.vocab_size, tokenizer=self.tokenizer,
                          max_train_tokens=self.max_train_tokens)


def perplexity(loss: float) -> float:
    """``exp(loss)``; a diverged run gives ``inf`` (or ``nan``) instead of an OverflowError."""
    return math.exp(loss) if loss < 700 else math.inf if loss == loss else math.nan


def _wrap(model: nn.Module, config: TrainConfig, processes: Processes) -> nn.Module:
    if not processes.distributed:
        return model
    if config.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[processes.device.index] if model_on_cuda(model) else None)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(processes.device.type, (processes.world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# Measured on 2 CPU cores (BENCHMARKS.md, benchmarks/model_speed.py): compiled blocks train the 2.5M `mini` only
# 1.02x faster (matrix products are 2/3 of its step and compiling cannot speed them up), a 9M model 1.08x, after
# 11-16 s of compilation; so auto compiles from 5M parameters, where runs are long enough to repay it.
COMPILE_MIN_PARAMETERS = 5_000_000


def compile_blocks(model: Llama, config: TrainConfig, device: torch.device) -> bool:
    """Compile each transformer block in place (``nn.Module.compile``: parameter names, state dicts and
    checkpoints unchanged; identical blocks share one compiled graph) when ``config.compile`` asks for it;
    returns whether it did. Done before DDP or FSDP2 wraps the blocks, as torchtitan does."""
    available = compiled.compiled_available(device.type)
    if config.compile == "on" and not available:
        raise ValueError(f"Invalid compile value: 'on' (torch.compile cannot build kernels on {device.type} here: "
                         "it needs a C++ compiler on the CPU, Triton on CUDA; use 'off' or 'auto')")
    parameters = sum(p.numel() for p in model.parameters())
    use = config.compile == "on" or (config.compile == "auto" and available
                                     and parameters >= COMPILE_MIN_PARAMETERS)
    if use:
        for block in model.layers:
            block.compile()
    return use


def model_on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).is_cuda


def _logits_and_loss(model: nn.Module, batch: Tensor, autocast: Any) -> tuple[Tensor, Tensor]:
    """fp32 logits of every position but the last (flattened) and their mean next-token cross-entropy."""
    with autocast:
        logits = model(batch[:, :-1])
    logits = logits.float().flatten(0, 1)
    return logits, F.cross_entropy(logits, batch[:, 1:].flatten())


def _loss(model: nn.Module, batch: Tensor, autocast: Any) -> Tensor:
    return _logits_and_loss(model, batch, autocast)[1]


def z_loss_term(logits: Tensor) -> Tensor:
    """mean over positions of (log Z)², log Z = logsumexp of a position's logits (PaLM's auxiliary loss)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


@torch.no_grad()
def evaluate(model: nn.Module, data: TokenData, config: TrainConfig, processes: Processes, micro: int,
             autocast: Any) -> float:
    """Mean token cross-entropy over the first ``eval_tokens`` of the validation split (every process runs
    the same number of forward passes, as FSDP requires)."""
    windows = TokenWindows(data.validation, config.seq_len, seed=0)
    count = max(processes.world, min(windows.count, config.eval_tokens // config.seq_len))
    count -= count % processes.world
    mine = list(range(processes.rank, count, processes.world))
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=processes.device)
    for start in range(0, len(mine), micro):
        batch = torch.stack([torch.from_numpy(windows.window(i % windows.count)) for i in mine[start:start + micro]])
        total += _loss(model, batch.to(processes.device), autocast).double() * len(batch)
    model.train()
    return processes.mean(total / len(mine)).item()


# ------------------------------------------------------------------------------------------ setup


@dataclass
class Run:
    """Everything a training loop touches, built once by :func:`_set_up`."""

    config: TrainConfig
    processes: Processes
    start: Start  # what the run folder holds and how this run begins there
    run_dir: Path
    micro: int  # sequences per process per forward pass
    accumulation: int  # micro-steps per optimizer step
    data: TokenData
    model: nn.Module  # as trained (DDP- or FSDP-wrapped under torchrun)
    parameters: int
    setup: OptimizerSetup
    scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast: Any
    compiled: bool  # the blocks run through torch.compile

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / checkpoint.CHECKPOINT


def _set_up(config: TrainConfig) -> Run:
    """Processes, data (tokenized once by rank 0), model, optimizer and LR schedule; the run folder is checked
    first and written last, so a refused or failing setup leaves it as it was."""
    start = plan(config)
    processes = Processes.start()
    run_dir = Path(config.run_dir)
    micro = config.micro_batch_size or config.batch_size // processes.world
    if micro < 1 or config.batch_size % (micro * processes.world):
        raise ValueError(f"Invalid micro_batch_size value: {micro} (batch_size {config.batch_size} must be a "
                         f"multiple of micro_batch_size × processes = {micro} × {processes.world})")
    data_config = config.data_config()
    if processes.rank == 0:
        data = prepare(data_config, config.cache_dir)
    processes.barrier()
    if processes.rank != 0:
        data = prepare(data_config, config.cache_dir)  # the cache rank 0 wrote

    torch.manual_seed(config.seed)  # same initial weights on every process
    model_config = replace(CONFIGS[config.model], vocab=data.vocab_size, qk_norm=config.qk_norm,
                           max_positions=max(config.seq_len, CONFIGS[config.model].max_positions))
    model = Llama(model_config).to(processes.device)
    if config.pure_bf16:
        model = model.to(torch.bfloat16)
    quantize_model(model, config.quant, lambda name, m: is_block_matrix(f"{name}.weight", m.weight.shape))
    is_compiled = compile_blocks(model, config, processes.device)
    model = _wrap(model, config, processes)
    core = model.module if hasattr(model, "module") else model
    options = dict(config.optimizer_args)
    if config.pure_bf16 and config.optimizer.removesuffix("+adagn") in ("spam", "spam-sparse", "stable-spam"):
        options.setdefault("fp32_moments", False)  # torch's optimizers keep bf16 state for bf16 parameters
    setup = build_optimizer(config.optimizer, core, optimizer_layout(model_config), lr=config.lr,
                            weight_decay=config.weight_decay, options=options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        setup.optimizer, lambda s: lr_multiplier(s, config.warmup_steps, config.steps, config.min_lr_ratio))
    on_cuda = processes.device.type == "cuda" and not config.pure_bf16
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()
    if processes.rank == 0:
        begin(start, config)
    processes.barrier()
    return Run(config, processes, start, run_dir, micro, config.batch_size // (micro * processes.world), data, model,
               sum(math.prod(shape) for shape in model_config.parameter_shapes().values()), setup, scheduler,
               autocast, is_compiled)


def _resume(run: Run) -> dict[str, Any]:
    """Restore the last checkpoint when asked and present; returns the rest of it (``{}``: a fresh start)."""
    if not run.start.resume:
        return {}
    saved = checkpoint.load(run.checkpoint_path, model=run.model, optimizer=run.setup.optimizer,
                            distributed=run.processes.distributed)
    run.scheduler.load_state_dict(saved["scheduler"])
    # The schedule is a function of the run's length, which --steps may have changed: the next step's rate is
    # the new schedule's (for an unchanged length, the value the checkpoint holds).
    scheduler = run.scheduler
    for group, base, rule in zip(run.setup.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * rule(scheduler.last_epoch)
    if run.setup.clipper is not None:
        run.setup.clipper.load_state_dict(saved["clipper"])
    torch.set_rng_state(saved["rng"])
    if saved.get("cuda_rng") is not None and run.processes.device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"], run.processes.device)
    return saved


def _save(run: Run, step: int, monitor: Any, loss: Tensor) -> None:
    device = run.processes.device
    if monitor is not None:
        monitor.flush()  # the spike records up to this step are on disk with the state that continues them
    checkpoint.save(run.checkpoint_path, model=run.model, optimizer=run.setup.optimizer, rank=run.processes.rank,
                    distributed=run.processes.distributed, step=step, loss=loss,
                    scheduler=run.scheduler.state_dict(),
                    samples_seen=step * run.config.batch_size, rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    clipper=run.setup.clipper.state_dict() if run.setup.clipper else None, config=asdict(run.config),
                    spike_monitor=monitor.state_dict() if monitor is not None else None)


def _spike_monitor(run: Run, saved: dict[str, Any]) -> Any:
    """The SpikeMonitor of ``--spikes`` on rank 0 (None otherwise), continued from the checkpoint ``saved``;
    it needs whole gradients, and with ``nullify_spikes`` one process (it edits the gradients only there)."""
    if not (run.config.spikes or run.config.nullify_spikes or run.config.forensics):
        return None
    if run.config.nullify_spikes and run.processes.distributed:
        raise ValueError("Invalid nullify_spikes value: True (the monitor runs on rank 0 only, so zeroing there "
                         "would let the processes' gradients differ: use one process)")
    if run.config.parallel == "fsdp" and run.processes.distributed:
        raise ValueError("Invalid spikes value: True (spike telemetry needs whole gradients: use --parallel ddp)")
    if run.processes.rank != 0:
        return None
    from spamopt.spikes import SpikeMonitor

    core = _core(run)
    optimizer = run.setup.optimizer
    forensics = run.config.forensics
    if forensics:
        core.record_attention_logits(True)
    monitor = SpikeMonitor(core, run.run_dir / "spikes", nullify=run.config.nullify_spikes, updates=forensics,
                           optimizer=optimizer if forensics or hasattr(optimizer, "record_statistics") else None)
    if saved.get("spike_monitor") is not None:
        monitor.load_state_dict(saved["spike_monitor"])
    return monitor


# ------------------------------------------------------------------------------------------- train


def _core(run: Run) -> nn.Module:
    """The Llama itself (DDP wraps it as ``.module``)."""
    return run.model.module if hasattr(run.model, "module") else run.model


def _forward_backward(run: Run, windows: TokenWindows, step: int,
                      signals: dict[str, Tensor] | None = None) -> Tensor:
    """Accumulate the gradients of optimizer step ``step`` (0-based); returns its mean loss on this process.
    With ``signals`` (a dict to fill), also the forensic signals of the step: the output logits' mean
    log-sum-exp (averaged over micro-batches) and each layer's largest attention logit (their maximum)."""
    config, processes, model = run.config, run.processes, run.model
    step_loss = torch.zeros((), device=processes.device)
    for m in range(run.accumulation):
        first = step * config.batch_size + (m * processes.world + processes.rank) * run.micro
        batch = windows.batch(first, run.micro).to(processes.device)
        sync = m == run.accumulation - 1 or not hasattr(model, "no_sync")
        with nullcontext() if sync else model.no_sync():
            logits, loss = _logits_and_loss(model, batch, run.autocast)
            objective = loss + config.z_loss * z_loss_term(logits) if config.z_loss else loss
            (objective / run.accumulation).backward()
        step_loss += loss.detach() / run.accumulation
        if signals is not None:
            log_z = torch.logsumexp(logits.detach().float(), dim=-1).mean() / run.accumulation
            signals["output_log_z"] = signals.get("output_log_z", 0.0) + log_z
            for layer, largest in enumerate(_core(run).attention_logits()):
                key = f"max_attention_logit.layers.{layer}"
                signals[key] = largest if key not in signals else torch.maximum(signals[key], largest)
    return step_loss


def _optimizer_step(run: Run, windows: TokenWindows, step: int, monitor: Any,
                    running_loss: Tensor) -> tuple[float, Tensor]:
    """One optimizer step (0-based ``step``): gradients, telemetry, clipping, update, LR schedule; adds the
    step's loss to ``running_loss`` and returns the learning rate it used and the loss."""
    signals: dict[str, Tensor] | None = {} if monitor is not None and run.config.forensics else None
    step_loss = _forward_backward(run, windows, step, signals)
    running_loss += step_loss
    if monitor is not None:  # the raw gradients, before any clipping; steps numbered as in the metrics
        monitor.observe(step=step + 1, loss=step_loss, signals=signals)
    if run.config.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    if run.setup.clipper is not None:
        run.setup.clipper(run.model)
    lr = float(run.setup.optimizer.param_groups[0]["lr"])
    run.setup.optimizer.step()
    run.scheduler.step()
    run.setup.optimizer.zero_grad(set_to_none=True)
    return lr, step_loss


def train(config: TrainConfig) -> dict[str, Any]:
    """Train, evaluate, checkpoint; returns (and writes to ``summary.json``) the run's final numbers."""
    run = _set_up(config)
    processes, model, optimizer = run.processes, run.model, run.setup.optimizer
    saved = _resume(run)
    start = saved.get("step", 0)
    metrics = Metrics(run.run_dir, config=asdict(config), resumed_step=start, enabled=processes.rank == 0,
                      tensorboard=config.tensorboard, wandb=config.wandb)
    monitor = _spike_monitor(run, saved)
    windows = TokenWindows(run.data.train, config.seq_len, config.seed)
    progress = None
    if config.progress and processes.rank == 0:
        progress = require("tqdm", "lm").tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True)

    tokens_per_step = config.batch_size * config.seq_len
    running_loss = torch.zeros((), device=processes.device)
    loss_from = timed_from = start  # the step the running loss and the clock count from
    clock = time.perf_counter()
    val_loss: float | None = None
    peak: dict[str, Any] = {}
    # The second step of the process is measured (and so not timed): by then the optimizer state exists for
    # the whole step, as in every later one (during the first, it appears only after the backward's peak).
    measured = start + 1 if start + 1 < config.steps else start
    stopped: checkpoint.NonFiniteError | None = None
    try:
        for step in range(start, config.steps):
            if step == measured:
                with step_peak_memory(model, optimizer, processes.device) as peak:
                    lr, step_loss = _optimizer_step(run, windows, step, monitor, running_loss)
                clock, timed_from = time.perf_counter(), step + 1
            else:
                lr, step_loss = _optimizer_step(run, windows, step, monitor, running_loss)
            done = step + 1

            if done % config.log_every == 0 or done == config.steps:
                train_loss = processes.mean(running_loss).item() / (done - loss_from)
                record = {"train_loss": train_loss, "lr": lr}
                if done > timed_from:
                    record["tokens_per_s"] = tokens_per_step * (done - timed_from) / (time.perf_counter() - clock)
                metrics.log(done, **record)
                if progress is not None:
                    progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record.get('tokens_per_s', 0):,.0f}",
                                         refresh=False)
                running_loss.zero_()
                clock, loss_from, timed_from = time.perf_counter(), done, done
            if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
                val_loss = evaluate(model, run.data, config, processes, run.micro, run.autocast)
                metrics.log(done, val_loss=val_loss, val_perplexity=perplexity(val_loss))
                clock = time.perf_counter()  # evaluation is not training throughput
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
                _save(run, done, monitor, step_loss)
                clock = time.perf_counter()
            if progress is not None:
                progress.update(1)
    except checkpoint.NonFiniteError as error:  # diverged: the last good checkpoint stays, the run ends here
        stopped, val_loss = error, math.nan

    if val_loss is None:  # resumed a finished run
        val_loss = evaluate(model, run.data, config, processes, run.micro, run.autocast)
    for closing in (progress, monitor, metrics):
        if closing is not None:
            closing.close()
    return _summarize(run, val_loss, peak, stopped)


def _summarize(run: Run, val_loss: float, peak: dict[str, Any],
               stopped: checkpoint.NonFiniteError | None) -> dict[str, Any]:
    summary = {
        "optimizer": run.config.optimizer, "seed": run.config.seed, "steps": run.config.steps,
        "val_loss": val_loss, "val_perplexity": perplexity(val_loss),
        "optimizer_state_bytes_per_process": state_bytes(run.setup.optimizer),
        "parameters": run.parameters, "processes": run.processes.world, "device": str(run.processes.device),
        "compiled": run.compiled,
    }
    if peak:  # the run's second step, per process
        summary.update(peak_step_memory_bytes=peak["bytes"], peak_step_memory_method=peak["method"])
    if run.processes.device.type == "cuda":
        summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated(run.processes.device)
    if stopped is not None:
        summary.update(diverged=True, stopped_at_step=stopped.step, stopped=str(stopped))
    if run.processes.rank == 0:
        write_summary(run.run_dir, summary)
    return summary
