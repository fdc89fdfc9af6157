"""SPAM inside ``transformers.Trainer``: passed through the Trainer's own ``optimizer_cls_and_kwargs`` (its
decay / no-decay groups and its LR scheduler), a run resumed from a Trainer checkpoint with
``resume_from_checkpoint`` equals the uninterrupted run bit for bit across a momentum reset, and under
gradient accumulation SPAM counts optimizer steps, not micro-batches."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from spamopt import SPAM  # noqa: E402

from .tiny import TokenData, assert_same_training, spam_options, tiny_llama  # noqa: E402


def _trainer(output_dir, max_steps: int = 12, accumulation: int = 1) -> transformers.Trainer:
    options = spam_options()
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation, learning_rate=options.pop("lr"), lr_scheduler_type="cosine",
        warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0, save_strategy="steps", save_steps=6,
        logging_steps=100, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    return transformers.Trainer(model=tiny_llama(), args=args, train_dataset=TokenData(),
                                optimizer_cls_and_kwargs=(SPAM, options))


def _spam(trainer: transformers.Trainer) -> SPAM:
    """The SPAM instance behind the Trainer's (accelerate-wrapped) optimizer."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def test_trainer_builds_spam_with_its_groups_and_scheduler(tmp_path):
    """The Trainer's optimizer is SPAM with its two groups (decay 0.1, and no decay for biases and norms) and
    steps under the Trainer's cosine schedule; 12 optimizer steps: SPAM's clock reads 12."""
    trainer = _trainer(tmp_path)
    trainer.train()
    optimizer = _spam(trainer)
    assert isinstance(optimizer, SPAM)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.1]
    assert all(int(s["global_step"]) == 12 for s in optimizer.state.values())
    assert trainer.lr_scheduler.get_last_lr()[0] < 1e-3  # the cosine schedule reached SPAM's groups


def test_resume_from_checkpoint_is_bit_exact_across_a_reset(tmp_path):
    """Checkpoint at step 6, reset at step 8, end at 12: resuming from checkpoint-6 in a fresh Trainer gives
    the same parameters and SPAM state as the uninterrupted run."""
    whole = _trainer(tmp_path / "whole")
    whole.train()
    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-6"))
    assert_same_training(list(whole.model.named_parameters()), _spam(whole),
                         [p for _, p in resumed.model.named_parameters()], _spam(resumed))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    """With 3 micro-batches per step, 4 optimizer steps advance SPAM's clock by 4, not 12."""
    trainer = _trainer(tmp_path, max_steps=4, accumulation=3)
    trainer.train()
    optimizer = _spam(trainer)
    assert all(int(s["global_step"]) == 4 for s in optimizer.state.values())
