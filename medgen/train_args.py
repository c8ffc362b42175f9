"""The trl.SFTConfig arguments the train stage sets itself, in one table: ``train.sft_config`` builds SFTConfig
from it, and validation refuses the same keys in ``train.sft_args`` (naming the medgen field to use instead).

Kept free of torch/transformers imports so that ``medgen validate`` stays instant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple


@dataclass(frozen=True)
class Resolved:
    """What train decides at start-up, beyond the config: the precision, where the run trains, compiled or not."""

    precision: str  # bf16 | fp16 | fp32
    cpu: bool
    deepspeed: bool
    compile: bool = False


class Arg(NamedTuple):
    key: str  # the SFTConfig field
    owner: str  # the medgen config field that sets it; '' = fixed, because exact resume or the stream need it
    value: Callable[[Any, Resolved], Any] | None  # None: refused in sft_args, but not passed (see its comment)


def _t(name: str) -> Callable[[Any, Resolved], Any]:
    return lambda cfg, r: getattr(cfg.train, name)


ARGS: tuple[Arg, ...] = (
    Arg("output_dir", "run.dir", lambda cfg, r: str(cfg.layout.checkpoints)),
    Arg("max_steps", "train.max_steps", _t("max_steps")),
    Arg("num_train_epochs", "train.max_steps", None),  # max_steps wins over it
    Arg("per_device_train_batch_size", "train.batch_size", _t("batch_size")),
    Arg("gradient_accumulation_steps", "train.grad_accum", _t("grad_accum")),
    Arg("learning_rate", "train.learning_rate", _t("learning_rate")),
    Arg("lr_scheduler_type", "train.lr_scheduler", _t("lr_scheduler")),
    Arg("warmup_steps", "train.warmup_steps", _t("warmup_steps")),
    Arg("weight_decay", "train.weight_decay", _t("weight_decay")),
    Arg("max_grad_norm", "train.max_grad_norm", _t("max_grad_norm")),
    Arg("seed", "train.seed", _t("seed")),
    Arg("data_seed", "train.seed", _t("seed")),
    # SFTConfig's own defaults (bf16=True, gradient_checkpointing=True, lr 2e-5) are overridden on purpose
    Arg("bf16", "train.precision", lambda cfg, r: r.precision == "bf16"),
    Arg("fp16", "train.precision", lambda cfg, r: r.precision == "fp16"),
    Arg("torch_compile", "train.compile", lambda cfg, r: r.compile),
    Arg("gradient_checkpointing", "train.gradient_checkpointing", _t("gradient_checkpointing")),
    Arg("logging_steps", "train.logging_steps", _t("logging_steps")),
    # always "steps": the Trainer then checkpoints the last step too, so a finished run can be extended
    # (a larger train.max_steps resumes from it, medgen/schedule.py); "no" would leave nothing to resume
    Arg("save_strategy", "train.save_steps", lambda cfg, r: "steps"),
    Arg("save_steps", "train.save_steps", lambda cfg, r: cfg.train.save_steps or cfg.train.max_steps),
    # left at None (keep all): medgen keeps the last train.keep_checkpoints complete ones itself (checkpoint.py)
    Arg("save_total_limit", "train.keep_checkpoints", lambda cfg, r: None),
    Arg("max_length", "train.max_length", _t("max_length")),
    Arg("deepspeed", "train.deepspeed", lambda cfg, r: cfg.train.deepspeed or None),
    # accelerate's CPU mode would drop DeepSpeed (dist.init_distributed)
    Arg("use_cpu", "", lambda cfg, r: r.cpu and not r.deepspeed),
    Arg("accelerator_config", "", lambda cfg, r: {"use_configured_state": True} if r.cpu and r.deepspeed else None),
    Arg("ignore_data_skip", "", lambda cfg, r: True),  # the stream restores its own position; never replay batches
    Arg("packing", "", lambda cfg, r: False),  # blocks are packed by medgen's stream
    Arg("dataset_kwargs", "", lambda cfg, r: {"skip_prepare_dataset": True}),
    Arg("dataloader_num_workers", "", lambda cfg, r: 0),
    Arg("resume_from_checkpoint", "", None),  # train resumes from the newest complete checkpoint itself
    # validation is medgen's own (medgen/validate.py): exact perplexity, the best step kept, early stopping
    Arg("eval_strategy", "train.eval_steps", None),
    Arg("eval_steps", "train.eval_steps", None),
    Arg("load_best_model_at_end", "train.final_adapter", None),
    Arg("metric_for_best_model", "train.final_adapter", None),
)
OWNERS = {a.key: a.owner for a in ARGS}


def managed(cfg, resolved: Resolved) -> dict[str, Any]:
    """The SFTConfig arguments medgen sets (None: SFTConfig's own default, which is what medgen wants there)."""
    values = {a.key: a.value(cfg, resolved) for a in ARGS if a.value is not None}
    return {k: v for k, v in values.items() if v is not None}


def schedulers() -> list[str]:
    """The learning-rate schedules the installed transformers knows (its SchedulerType), read from its source:
    importing transformers.trainer_utils would import torch, seconds that validating a config must not cost."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers.trainer_utils")
    if spec is None or not spec.origin:
        return []
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SchedulerType"), None)
    if cls is None:
        return []
    return [node.value.value for node in cls.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]


def check_scheduler(name: str) -> list[str]:
    known = schedulers()
    if known and name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=1)
        return [f"train.lr_scheduler: unknown schedule {name!r}" + (f"; did you mean {close[0]}?" if close else "")
                + f" (known: {', '.join(known)})"]
    return []


def check(sft_args: dict[str, Any]) -> list[str]:
    """train.sft_args may not hold a key medgen sets itself: one problem per key, naming the field to use."""
    p = []
    for k in sft_args:
        if k in OWNERS:
            own = OWNERS[k]
            p.append(f"train.sft_args.{k}: medgen sets this itself" + (f"; use {own}" if own else
                     " (exact resume and the packed data stream rely on it)"))
    return p
