"""Validation during training: the validation split scored with the evaluate stage's exact method, early
stopping, and the best step.

Every ``train.eval_steps`` optimizer steps (and at the last one) the first validation articles (manifest order)
that fit in the token budget are scored as ``medgen evaluate eval.split=validation eval.max_articles=<that
number>`` scores them: the same windows (eval.context, eval.stride), float64 sums per article, both sums
all-reduced, so the value is the same for any number of processes. Validation changes nothing in training: the
model is only run forward, in eval mode, under inference mode (no RNG draw, no gradient), and no training data
is read.

Early stopping: after ``train.early_stopping_patience`` evaluations in a row without a validation loss lower
than the best by more than ``train.early_stopping_min_delta``, training stops. A step that improves is saved as a
checkpoint and kept outside the keep-last-k rotation (medgen/checkpoint.py); the state below goes into every
checkpoint, so a preempted run resumes into the same decisions.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from medgen import dist, evaluate
from medgen.config import Config

log = logging.getLogger(__name__)
EVALUATIONS_PER_RUN = 5  # train.eval_steps=0, when the budget allows
# train.eval_tokens=0: the whole run's validation may cost this share of its training. A trained token costs about
# three forward passes (forward, and backward through the frozen weights to the adapters), a validation window
# token one; sliding windows count their overlap.
COST_SHARE = 0.04


@dataclass(frozen=True)
class Plan:
    articles: list[dict]  # the first validation articles, in manifest order, scored at every evaluation
    every: int  # optimizer steps between evaluations (and one at the last step)
    why: str  # how they were chosen, for the log and the record


def window_tokens(articles: list[dict], sep: int, context: int, stride: int) -> int:
    """What scoring them costs: tokens through the model, overlapping windows counted each time."""
    return sum(len(w.ids) for w in evaluate.plan(articles, sep, context, stride))


def plan(cfg: Config, articles: list[dict], sep: int, world_size: int) -> Plan:
    """Which articles and how often. Explicit settings are taken as they are; the automatic ones keep the whole
    run's validation near COST_SHARE of its training: EVALUATIONS_PER_RUN evaluations of the first articles that
    fit, or fewer evaluations (at least the last step) where the first article alone is more than one share."""
    t, e = cfg.train, cfg.eval
    trained = t.max_steps * t.batch_size * t.grad_accum * t.max_length * world_size
    allowed = COST_SHARE * 3 * trained  # window tokens for the whole run
    evaluations = math.ceil(t.max_steps / t.eval_steps) if t.eval_steps else EVALUATIONS_PER_RUN
    if t.eval_tokens:
        chosen, why = _first(articles, lambda a: sum(len(x["input_ids"]) for x in a) <= t.eval_tokens), \
            f"the first articles within train.eval_tokens={t.eval_tokens}"
    else:
        chosen = _first(articles, lambda a: evaluations * window_tokens(a, sep, e.context, e.stride) <= allowed)
        why = f"the first articles whose {evaluations} evaluations cost at most {COST_SHARE:.0%} of training"
        if not t.eval_steps:
            one = window_tokens(chosen, sep, e.context, e.stride)
            fit = max(1, min(EVALUATIONS_PER_RUN, int(allowed // one)))
            if fit < evaluations:
                evaluations = fit
                why = (f"one article costs {one} window tokens: {fit} evaluation(s) keep validation at most "
                       f"{COST_SHARE:.0%} of training")
    every = t.eval_steps or max(1, math.ceil(t.max_steps / evaluations))
    return Plan(chosen, every, why)


def _first(articles: list[dict], fits) -> list[dict]:
    """The longest prefix of ``articles`` that ``fits``; at least the first article."""
    n = 1
    while n < len(articles) and fits(articles[:n + 1]):
        n += 1
    return articles[:n]


@dataclass
class State:
    """What early stopping knows; written into every checkpoint and read back on resume."""

    best_loss: float | None = None
    best_step: int = 0
    bad: int = 0  # evaluations since the best without an improvement > min_delta
    stopped: str = ""  # why training stopped early ('' = it did not)
    last: dict[str, Any] = field(default_factory=dict)  # the latest evaluation

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "State":
        return cls(**d) if d else cls()


def validator(cfg: Config, manifest: dict, sep: int, rank: int, world: int, device: torch.device) -> "Validator | None":
    """The validator of a training run (None: train.validate off, or no validation articles)."""
    from medgen.data.stream import load_articles

    if not cfg.train.validate:
        return None
    articles = load_articles(cfg.shards_url, manifest, cfg.data.storage_options, "validation", ("id", "input_ids"),
                             cfg.data.retry_seconds)
    if not articles:
        log.warning("train: the prepared dataset has no validation articles: no validation during training "
                    "(data.val_fraction)")
        return None
    return Validator(cfg, plan(cfg, articles, sep, world), sep, rank, world, device)


class Validator:
    """This rank's share of the validation articles, scored on the training model."""

    def __init__(self, cfg: Config, chosen: Plan, sep: int, rank: int, world: int, device: torch.device):
        e = cfg.eval
        self.plan = chosen
        self.articles = articles = chosen.articles
        self.mine = articles[rank::world]  # disjoint by article, as evaluate splits them
        self.sep, self.batch_size, self.device, self.world = sep, e.batch_size, device, world
        self.context, self.stride = e.context, e.stride
        self.every = cfg.run.progress_every

    def window(self, model) -> None:
        self.context, self.stride = evaluate.effective_window(model, self.context, self.stride)

    def __call__(self, model) -> dict[str, float]:
        """Validation loss (mean NLL per predicted token) and perplexity, over every rank's articles."""
        was_training = model.training
        model.eval()
        try:
            # every rank runs as many forward passes (ZeRO-3 gathers weights in each, on every rank)
            batches = len(evaluate.plan(self.mine, self.sep, self.context, self.stride))
            most = int(_all_reduce([math.ceil(batches / self.batch_size)], self.device, torch.distributed.ReduceOp.MAX)[0])
            # lines at the interval only: the outcome is logged once every rank is done (Validate)
            rows = evaluate.score(model, self.mine, self.sep, self.context, self.stride, self.batch_size,
                                  self.device, "validate", min_batches=most, every=self.every, ends=False)
        finally:
            model.train(was_training)
        nll, tokens = _all_reduce([math.fsum(r[0] for r in rows), float(sum(r[1] for r in rows))], self.device)
        return {"eval_loss": nll / tokens, "eval_perplexity": math.exp(nll / tokens), "eval_tokens": int(tokens),
                "eval_articles": len(self.articles), "eval_nll_sum": nll}


def _all_reduce(values: list[float], device: torch.device, op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_distributed():
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t.tolist()


class Validate(TrainerCallback):
    """At every evaluation step: score, log (train log, TensorBoard, the job log), decide early stopping and ask
    for the checkpoint of a best step. Runs before the Trainer logs and saves the step."""

    def __init__(self, cfg: Config, validator: Validator, state: State, trainer):
        t = cfg.train
        self.validator, self.state, self.trainer = validator, state, trainer
        self.every, self.patience, self.min_delta = validator.plan.every, t.early_stopping_patience, t.early_stopping_min_delta

    def on_step_end(self, args, st, control, model=None, **kw):
        step = st.global_step
        if step % self.every and step < st.max_steps:
            return control
        m = self.validator(model)
        s = self.state
        improved = s.best_loss is None or m["eval_loss"] < s.best_loss - self.min_delta
        if improved:
            s.best_loss, s.best_step, s.bad = m["eval_loss"], step, 0
            control.should_save = True  # the best step is a checkpoint, kept outside the rotation
        else:
            s.bad += 1
        if self.patience and s.bad >= self.patience and step < st.max_steps:
            s.stopped = (f"early stopping at step {step}: validation loss {m['eval_loss']:.6f} did not improve on "
                         f"step {s.best_step}'s {s.best_loss:.6f} by more than {self.min_delta:g} in {s.bad} "
                         f"evaluation(s) (train.early_stopping_patience={self.patience})")
            control.should_training_stop = True
            control.should_save = True  # a rerun finds the decision in the checkpoint and trains no further
        s.last = {"step": step, **m}
        if st.is_world_process_zero:
            log.info("validation at step %d: loss %.4f, perplexity %.3f on %d articles (%d tokens); best step %d%s",
                     step, m["eval_loss"], m["eval_perplexity"], m["eval_articles"], m["eval_tokens"], s.best_step,
                     f"; {s.stopped}" if s.stopped else "")
        should_log = control.should_log  # Trainer.log clears it: the step's own training log must still happen
        self.trainer.log({**m, "eval_best_step": s.best_step})
        control.should_log = should_log
        return control
