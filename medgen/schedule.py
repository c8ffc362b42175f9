"""The learning-rate schedule across a resume: the one the config describes now, at the checkpoint's step.

A checkpoint holds the scheduler's state, and the Trainer loads it over the scheduler it has just built from the
config. For a LambdaLR (every schedule medgen offers but reduce_lr_on_plateau) that state holds the step and
the peak rates, not the shape: a run resumed with a larger ``train.max_steps`` (training extended), another
``learning_rate``, warm-up or schedule would take the new shape with the old peak, and its first step would
train at the rate the old schedule set (0 at the end of a cosine). ``ReapplySchedule`` sets the configured
peak rates and the rate of the resumed step from the schedule as configured, so every step after a resume
trains at the rate an uninterrupted run with today's config has at that step (tests/test_long_runs.py). With
an unchanged config this is the same arithmetic on the same numbers: the rates are bitwise those loaded.

Each checkpoint records the schedule it was trained with (``record``), so the resume says what changed.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback

from medgen.config import TrainConfig

log = logging.getLogger("medgen")

KEYS = ("max_steps", "learning_rate", "lr_scheduler", "warmup_steps", "loraplus_lr_ratio")


def record(t: TrainConfig) -> dict[str, Any]:
    """What a checkpoint keeps of the schedule it was trained with."""
    return {k: getattr(t, k) for k in KEYS}


def describe_change(before: dict[str, Any] | None, t: TrainConfig, step: int) -> str | None:
    """The one log line for a resume whose schedule settings differ from the checkpoint's (None: the same, or a
    checkpoint written before checkpoints recorded them)."""
    if not before:
        return None
    changed = [f"{k} {before[k]} -> {getattr(t, k)}" for k in KEYS if k in before and before[k] != getattr(t, k)]
    if not changed:
        return None
    if step >= t.max_steps:
        return (f"train: the newest checkpoint is step {step}, at or past train.max_steps={t.max_steps}: nothing "
                f"left to train ({', '.join(changed)})")
    return (f"train: resuming at step {step} with {', '.join(changed)}: steps {step + 1}-{t.max_steps} follow the "
            f"{t.lr_scheduler} schedule of {t.max_steps} steps as configured now, not the checkpoint's")


class ReapplySchedule(TrainerCallback):
    """On a resume, after the Trainer loaded the checkpoint's optimizer and scheduler: the configured peak rates
    (``trainer.configured_lrs``, read from the scheduler it built before the load replaced them) and the rate of
    the resumed step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kw):
        if state.global_step == 0 or not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        s = lr_scheduler
        s.base_lrs = list(self.trainer.configured_lrs)
        rates = [base * fn(s.last_epoch) for fn, base in zip(s.lr_lambdas, s.base_lrs, strict=True)]
        for group, base, rate in zip(s.optimizer.param_groups, s.base_lrs, rates, strict=True):
            group["initial_lr"] = base
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        s._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                      for g in s.optimizer.param_groups]
