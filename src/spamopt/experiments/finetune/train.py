"""One fine-tuning run, read top to bottom: load the base model, encode prompt + response with the loss on the
response only, train with the named optimizer under a warmup + cosine schedule, and every ``eval_every``
steps score the held-out items (multiple-choice accuracy and response loss) and checkpoint atomically. Batches
are drawn by a generator seeded with (seed, step), so a resumed run repeats an uninterrupted one exactly."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..harness import checkpoint
from ..harness.config import check_fields, option
from ..harness.metrics import Metrics
from ..harness.rundir import begin, overwrite_option, plan, resume_option, write_summary
from ..harness.optimizers import build_optimizer
from ..harness.schedule import lr_multiplier
from .data import Example, candidates, generate_task, prompt, read_jsonl, response_for
from .model import load_causal_lm

__all__ = ["FinetuneConfig", "train", "encode", "load_items", "scoring_batches", "evaluate", "GENERATED"]

GENERATED = "generated"
IGNORE = -100


@dataclass
class FinetuneConfig:
    """Everything a run depends on; saved as ``config.json`` in the run directory."""

    base: str = option("runs/finetune/base", "a spamopt train run directory, or a local transformers model dir")
    data: str = option(GENERATED, "'generated' (the embedded task) or a JSONL file in the LLM-Adapters format")
    eval_data: str = option("", "held-out JSONL; empty: the last eval_items of data after a seeded shuffle")
    train_items: int = option(4000, "items the generated task makes for training")
    eval_items: int = option(200, "held-out items scored at every evaluation")
    optimizer: str = option("spam", "a registry name: adamw, adam-clip, spam, stable-spam, ...")
    optimizer_args: dict[str, Any] = option(dict, "JSON object passed to the optimizer's constructor")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.0, "decoupled weight decay")
    steps: int = option(300, "optimizer steps")
    warmup_steps: int = option(20, "linear warmup, then cosine decay to 0.1 × lr")
    batch_size: int = option(16, "examples per step")
    max_length: int = option(128, "tokens per example; the prompt is cut from the left when longer")
    eval_every: int = option(50, "evaluate and checkpoint every k steps (and at the end)")
    seed: int = option(0, "seed of the data order (and of the generated task's training items)")
    run_dir: str = option("runs/finetune/run", "where config, metrics, checkpoint and summary go")
    resume: bool = resume_option()
    overwrite: bool = overwrite_option()

    FREE_ON_RESUME: ClassVar[frozenset[str]] = frozenset({"steps"})  # what --resume may change: the length

    def __post_init__(self) -> None:
        check_fields(self, {
            "train_items": (self.train_items >= 1, ">= 1"), "eval_items": (self.eval_items >= 1, ">= 1"),
            "lr": (self.lr > 0, "> 0"), "steps": (self.steps >= 1, ">= 1"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"), "batch_size": (self.batch_size >= 1, ">= 1"),
            "max_length": (self.max_length >= 8, ">= 8"), "eval_every": (self.eval_every >= 1, ">= 1"),
        })


def load_items(config: FinetuneConfig) -> tuple[list[Example], list[Example]]:
    """(training items, held-out items). The generated task's held-out items come from a seed no training
    set uses, and any that also occur in training are dropped."""
    if config.data == GENERATED:
        train = generate_task(config.train_items, seed=config.seed)
        seen = {e.instruction for e in train}
        held_out = [e for e in generate_task(config.eval_items * 2, seed=10_000) if e.instruction not in seen]
        return train, held_out[:config.eval_items]
    items = read_jsonl(config.data)
    if config.eval_data:
        return items, read_jsonl(config.eval_data)[:config.eval_items]
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    if len(shuffled) <= config.eval_items:
        raise ValueError(f"Invalid eval_items value: {config.eval_items} (data has only {len(items)} items; pass "
                         "--eval-data or fewer eval items)")
    return shuffled[:-config.eval_items], shuffled[-config.eval_items:]


def encode(prompt_ids: list[int], response_ids: list[int], eos: int, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels: the prompt's labels are ``IGNORE`` (no loss), the response's and the end token's
    are themselves. A prompt too long is cut from the left, so the response always stays."""
    response = response_ids + [eos]
    keep = max(0, max_length - len(response))
    prompt_ids = prompt_ids[len(prompt_ids) - keep:] if keep else []
    ids = (prompt_ids + response)[:max_length]
    return ids, ([IGNORE] * len(prompt_ids) + response)[:max_length]


def _batch(pairs: list[tuple[list[int], list[int]]], pad: int,
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets (padding never counts), on ``device``."""
    width = max(len(ids) for ids, _ in pairs)
    tokens = torch.full((len(pairs), width), pad)
    labels = torch.full((len(pairs), width), IGNORE)
    for row, (ids, lab) in enumerate(pairs):
        tokens[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
    return tokens.to(device), labels.to(device)


def _response_losses(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of each row's labelled tokens, each predicted from the ones before."""
    logits = model(tokens)[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return (nll * (targets != IGNORE)).sum(1)


def scoring_batches(loaded: Any, items: list[Example], pool: list[Example], max_length: int,
                    device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per held-out item, encoded once for every evaluation: one row per candidate answer (its response in
    place of the label) and the index of the true one."""
    batches = []
    for item in items:
        options = candidates(item, pool)
        prompt_ids = loaded.encode(prompt(item))
        pairs = [encode(prompt_ids, loaded.encode(response_for(item, answer)), loaded.eos, max_length)
                 for answer in options]
        batches.append((*_batch(pairs, loaded.eos, device), options.index(item.answer)))
    return batches


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, float]:
    """Accuracy: the candidate whose response has the highest likelihood is the model's answer. Loss: the
    mean response loss per token of the true responses."""
    model.eval()
    correct, loss, tokens_counted = 0, 0.0, 0
    for tokens, labels, true in batches:
        scores = _response_losses(model, tokens, labels)
        correct += int(scores.argmin()) == true
        loss += float(scores[true])
        tokens_counted += int((labels[true, 1:] != IGNORE).sum())
    model.train()
    return {"accuracy": correct / len(batches), "eval_loss": loss / tokens_counted}


def train(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune, evaluate, checkpoint; returns and writes ``summary.json``."""
    start = plan(config)
    loaded = load_causal_lm(config.base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device)
    train_items, held_out = load_items(config)
    scoring = scoring_batches(loaded, held_out, train_items + held_out, config.max_length, device)
    encoded = [encode(loaded.encode(prompt(e)), loaded.encode(e.output), loaded.eos, config.max_length)
               for e in train_items]
    setup = build_optimizer(config.optimizer, model, loaded.layout, lr=config.lr,
                            weight_decay=config.weight_decay, options=config.optimizer_args)
    optimizer = setup.optimizer
    begin(start, config)
    run_dir = start.run_dir
    path = run_dir / checkpoint.CHECKPOINT
    progress: dict[str, Any] = {"step": 0, "last": None, "best_accuracy": None}
    if start.resume:
        saved = checkpoint.load(path, model=model, optimizer=optimizer, distributed=False)
        progress = saved["progress"]
        if setup.clipper is not None:
            setup.clipper.load_state_dict(saved["clipper"])
    metrics = Metrics(run_dir, config=asdict(config), resumed_step=progress["step"])

    def record(train_loss: float | None) -> None:
        scores = evaluate(model, scoring)
        values = {**scores, **({} if train_loss is None else {"train_loss": train_loss})}
        metrics.log(progress["step"], **values)
        progress["last"] = values
        best = progress["best_accuracy"]
        progress["best_accuracy"] = scores["accuracy"] if best is None else max(best, scores["accuracy"])

    if progress["last"] is None:
        record(None)  # the base model, before any step
    window: list[float] = []
    stopped = None
    while progress["step"] < config.steps:
        step = progress["step"]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_multiplier(step, config.warmup_steps, config.steps, 0.1)
        order = random.Random(config.seed * 1_000_003 + step)
        tokens, labels = _batch([encoded[order.randrange(len(encoded))] for _ in range(config.batch_size)],
                                loaded.eos, device)
        loss = _response_losses(model, tokens, labels).sum() / (labels[:, 1:] != IGNORE).sum()
        loss.backward()
        if setup.clipper is not None:
            setup.clipper(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        progress["step"] = step + 1
        if progress["step"] % config.eval_every == 0 or progress["step"] == config.steps:
            record(sum(window) / len(window))
            window = []
            extra = {} if setup.clipper is None else {"clipper": setup.clipper.state_dict()}
            try:
                checkpoint.save(path, model=model, optimizer=optimizer, rank=0, distributed=False,
                                step=progress["step"], loss=loss.detach(), progress=progress, **extra)
            except checkpoint.NonFiniteError as error:  # diverged: the last good checkpoint stays
                stopped = error
                break
    metrics.close()
    last = progress["last"]
    summary = {"optimizer": config.optimizer, "seed": config.seed, "steps": progress["step"],
               "accuracy": last["accuracy"], "eval_loss": last["eval_loss"], "train_loss": last.get("train_loss"),
               "best_accuracy": progress["best_accuracy"], "base": loaded.description,
               "train_items": len(train_items), "eval_items": len(held_out),
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if not math.isfinite(summary["eval_loss"]) or stopped is not None:
        summary["diverged"] = True
    if stopped is not None:
        summary.update(stopped_at_step=stopped.step, stopped=str(stopped))
    write_summary(run_dir, summary)
    return summary
