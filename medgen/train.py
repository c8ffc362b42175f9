"""Stage 2, train: LoRA SFT with TRL's SFTTrainer + peft, streaming packed blocks from the shards.

Runs as one process or under ``accelerate launch`` / ``torchrun`` (the Trainer reads the launcher's
environment); each rank reads disjoint shards.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from medgen import models
from medgen.config import Config
from medgen.data import shards, stream

log = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 where it is measurably faster (CUDA with bf16, CPU with avx512_bf16/AMX), else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def sft_config(cfg: Config, precision: str):
    from trl import SFTConfig

    t = cfg.train
    run_dir = Path(cfg.run.dir)
    args: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        # SFTConfig's own defaults (bf16=True, gradient_checkpointing=True, lr 2e-5) are overridden on purpose
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        report_to=["tensorboard"],
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        max_length=t.max_length,
        packing=False,  # blocks are packed by medgen's stream (exact, per shard)
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    args.update(t.sft_args)
    return SFTConfig(**args)


class JsonlLogger:
    """TrainerCallback writing every log event, with tokens/s, to <run.dir>/train_log.jsonl (rank 0)."""

    def __new__(cls, path: Path, tokens_per_step: int):
        from transformers import TrainerCallback

        class _Cb(TrainerCallback):
            def __init__(self):
                self.t0 = time.time()
                self.last_step, self.last_t = 0, self.t0

            def on_log(self, args, state, control, logs=None, **kw):
                if not state.is_world_process_zero or not logs:
                    return
                now = time.time()
                steps = state.global_step - self.last_step
                rec = {"step": state.global_step, "time": round(now - self.t0, 3), **logs}
                if steps > 0 and "loss" in logs:
                    rec["tokens_per_s"] = round(steps * tokens_per_step / max(now - self.last_t, 1e-9), 1)
                    self.last_step, self.last_t = state.global_step, now
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")

        return _Cb()


def run(cfg: Config) -> dict[str, Any]:
    from peft import LoraConfig
    from trl import SFTTrainer

    t = cfg.train
    run_dir = Path(cfg.run.dir)
    tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    manifest = shards.read_manifest(cfg.shards_url, cfg.data.storage_options)
    shards.check_tokenizer(manifest, models.tokenizer_fingerprint(tok), cfg.model.name_or_path, cfg.shards_url)
    precision = resolve_precision(t.precision)
    model = models.load_model(cfg.model.name_or_path, cfg.model.revision, torch.float32)
    targets, fan_in_fan_out = models.lora_targets(model, cfg.lora.target_modules)
    peft_config = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM",
    )
    dataset = stream.train_stream(cfg.shards_url, manifest, cfg.data.storage_options, t.max_length, tok.eos_token_id)
    # transformers 5 dropped TrainingArguments.logging_dir; the TensorBoard callback reads this instead
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    args = sft_config(cfg, precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = t.batch_size * t.grad_accum * t.max_length * world
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config,
        callbacks=[JsonlLogger(run_dir / "train_log.jsonl", tokens_per_step)],
    )
    if trainer.is_world_process_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("train: %s + LoRA r=%d on %s, %s, %d steps x %d tokens", cfg.model.name_or_path, cfg.lora.r,
                 targets, precision, t.max_steps, tokens_per_step)
    resume = _latest_checkpoint(Path(args.output_dir))
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    adapter_dir = run_dir / "adapter"
    if trainer.is_world_process_zero():
        _save_atomic(trainer, adapter_dir)
        if t.merge:
            _save_merged(trainer.model, tok, run_dir / "merged")
    trainer.accelerator.wait_for_everyone()
    return {"train_loss": result.training_loss, "steps": result.global_step, "precision": precision,
            "adapter": str(adapter_dir)}


def _latest_checkpoint(d: Path) -> Path | None:
    done = [p for p in d.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_atomic(trainer, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(str(tmp), safe_serialization=True)
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _save_merged(peft_model, tok, target: Path) -> None:
    import copy

    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(str(target), safe_serialization=True)
    tok.save_pretrained(str(target))
