"""Stage 2, train: LoRA SFT with TRL's SFTTrainer + peft, streaming packed blocks from the shards.

Runs as one process or under ``accelerate launch`` / ``torchrun`` (DDP or DeepSpeed ZeRO-2/3). Exact
resume: a checkpoint holds the adapter, optimizer, scheduler, every rank's RNG state and every data
stream's position; it is written as ``checkpoint-N`` by the Trainer and renamed to ``step-N`` only
once complete on all ranks, and start-up resumes from the newest ``step-N`` (the protocol:
medgen/checkpoint.py). SIGTERM/SIGUSR2 make every
rank checkpoint at the next step boundary and stop (exit code 75, rerun to resume); SIGUSR1 asks for a
checkpoint and goes on.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import SFTTrainer

from medgen import (allocator, atomic, dist, elastic, lm_loss, logs, memory, models, provenance, schedule,
                    throughput, tracking, train_args, validate, watchdog)
from medgen.checkpoint import Checkpoints
from medgen.config import Config
from medgen.data import shards, storage
from medgen.data.stream import PackedStream, as_hf_iterable, collate
from medgen.errors import Preempted, UserError
from medgen.layout import RunLayout

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


def resolve_compile(setting: str | bool, deepspeed: bool) -> bool:
    """'auto' -> on where it was measured to pay: a GPU (1.45x on an H100), not under DeepSpeed (which compiles
    by its own settings); not on a CPU, where it was slower (bench/RESULTS.md)."""
    if setting != "auto":
        return bool(setting)
    return torch.cuda.is_available() and not deepspeed


def sft_config(cfg: Config, precision: str):
    """SFTConfig: what medgen sets itself (medgen/train_args.py, refused in train.sft_args), defaults a user may
    change through train.sft_args, then train.sft_args. Starts the distributed state first (medgen/dist.py)."""
    from trl import SFTConfig

    deepspeed = dist.deepspeed_requested(cfg.train.deepspeed)
    dist.init_distributed(deepspeed=deepspeed, timeout=watchdog.pg_timeout(cfg.run))
    resolved = train_args.Resolved(precision=precision, cpu=not torch.cuda.is_available(), deepspeed=deepspeed,
                                   compile=resolve_compile(cfg.train.compile, deepspeed))
    args: dict[str, Any] = dict(
        report_to="none",  # TensorBoard is medgen's own callback, writing to <run.dir>/tensorboard (_tensorboard)
        ddp_find_unused_parameters=False,
        disable_tqdm=True,  # the Trainer's bar and printed dicts: medgen's ShowProgress in their place
        log_level_replica="passive",  # the Trainer would set the other ranks' transformers logging to "warning"
    )
    args.update(train_args.managed(cfg, resolved))
    args.update(cfg.train.sft_args)
    return SFTConfig(**args)


# --------------------------------------------------------------------------- signals


class Signals:
    """Handlers only set flags; the step-boundary callback acts on them on every rank at once."""

    PREEMPT = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.preempt = False
        self.received = ""  # the preemption signal this process got ('' = none: another rank's stopped us)
        self.save_now = False
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.PREEMPT:
            self.previous[sig] = signal.signal(sig, self._on_preempt)
        self.previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_save)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _on_preempt(self, signum, frame) -> None:
        self.preempt = True
        self.received = self.received or signal.Signals(signum).name

    def _on_save(self, signum, frame) -> None:
        self.save_now = True


# --------------------------------------------------------------------------- callbacks


class RecordingCollator:
    """``collate`` that remembers which blocks it batched, for the per-step sample log."""

    def __init__(self):
        self.samples: list[str] = []

    def __call__(self, items):
        self.samples += [it.pop("sample") for it in items]
        return collate(items)

    def take(self) -> list[str]:
        out, self.samples = self.samples, []
        return out


class SampleLog(TrainerCallback):
    """Which blocks every step trained on, per rank (<run.dir>/samples/rank-N.jsonl): what the exact-resume
    and data-stream tests compare."""

    def __init__(self, layout: RunLayout, collator: RecordingCollator):
        self.layout, self.collator = layout, collator

    def on_step_end(self, args, state, control, **kw):
        self.layout.samples.mkdir(parents=True, exist_ok=True)
        with open(self.layout.samples_of(args.process_index), "a") as f:
            f.write(json.dumps({"step": state.global_step, "samples": self.collator.take()}) + "\n")


class StopOnSignal(TrainerCallback):
    """The signal flags, all-reduced at every step boundary, so every rank saves and stops at the same step."""

    def __init__(self, signals: Signals):
        self.signals = signals
        self.preempted = False

    def on_step_end(self, args, state, control, **kw):
        flags = torch.tensor([self.signals.preempt, self.signals.save_now], dtype=torch.int32)
        if dist.is_distributed():
            flags = flags.to(args.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        preempt, save_now = bool(flags[0]), bool(flags[1])
        if preempt or save_now:
            control.should_save = True
            self.signals.save_now = False
        if preempt:
            if not self.preempted and self.signals.received:  # which rank (node) got what, for the job's log
                log.warning("rank %d received %s: checkpointing at step %d, then stopping", args.process_index,
                            self.signals.received, state.global_step)
            control.should_training_stop = True
            self.preempted = True
        return control


class MarkProgress(TrainerCallback):
    """Marks each micro-batch, step and checkpoint for the watchdog (medgen/watchdog.py): attribute writes,
    no I/O, no collective."""

    def on_substep_end(self, args, state, control, **kw):
        watchdog.progress("step", state.global_step)

    def on_step_end(self, args, state, control, **kw):
        watchdog.progress("step", state.global_step)

    def on_save(self, args, state, control, **kw):
        watchdog.progress("checkpoint", state.global_step)


class CommitCheckpoint(TrainerCallback):
    """After the Trainer saved checkpoint-N: every rank adds its data streams' positions, then rank 0 commits it
    as step-N once all have (medgen/checkpoint.py), with the validation state (medgen/validate.py)."""

    def __init__(self, checkpoints: Checkpoints, stream: PackedStream, validation: validate.State | None,
                 records: dict[str, Any]):
        self.checkpoints, self.stream, self.validation, self.records = checkpoints, stream, validation, records

    def on_save(self, args, state, control, **kw):
        self.checkpoints.add_stream_state(state.global_step, args.process_index, self.stream.state_dict())
        dist.barrier()
        if state.is_world_process_zero:
            vstate = self.validation.as_dict() if self.validation else None
            log.info("checkpoint %s saved", self.checkpoints.commit(state.global_step, args.world_size,
                                                                    validation=vstate, **self.records))
        dist.barrier()


class Throughput(TrainerCallback):
    """tokens/s, MFU where the device's peak is known, the peak memory of every rank, and the data seen: tokens
    trained on and that as a share of the training split (1.0 = one pass; the Trainer's "epoch" means nothing
    for a stream), added to the step's logs (TensorBoard and the train log, added after this callback, see
    them). Every rank gets here: the peak memory is gathered, a collective."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None, split_tokens: int):
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.split_tokens = split_tokens
        self.t_last, self.step_last = time.time(), None
        self.memory_per_rank: list[float] = []  # of the step just logged

    def on_log(self, args, state, control, logs=None, **kw):
        self.memory_per_rank = []
        if not logs or "loss" not in logs:
            return
        self.memory_per_rank = throughput.per_rank(throughput.peak_memory_gb(args.device), args.device)
        now = time.time()
        logs["peak_memory_gb"] = round(max(self.memory_per_rank), 3)
        logs["tokens_seen"] = state.global_step * self.tokens_per_step
        logs["train_fraction"] = round(logs["tokens_seen"] / max(self.split_tokens, 1), 6)
        logs.pop("epoch", None)  # the Trainer's, over a stream with no length: tokens_seen/train_fraction say it
        if self.step_last is not None and state.global_step > self.step_last:
            tps = (state.global_step - self.step_last) * self.tokens_per_step / (now - self.t_last)
            logs["tokens_per_s"] = round(tps, 1)
            if self.peak_flops:
                logs["mfu"] = round(tps * self.flops_per_token / self.peak_flops, 4)
        self.t_last, self.step_last = now, state.global_step


class ShowProgress(TrainerCallback):
    """The steps where a person reads them, on rank 0 (logs.Steps): a line per logged step, with what Throughput
    added, and a bar on a terminal. In place of the Trainer's own (removed by build_trainer): in a job log its bar
    was carriage returns and its printed logs had neither a time, nor the rate, nor the memory."""

    def __init__(self):
        self.steps: logs.Steps | None = None

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.steps = logs.Steps(state.max_steps, state.global_step)

    def on_step_end(self, args, state, control, **kw):
        if self.steps:
            self.steps.step()

    def on_log(self, args, state, control, logs=None, **kw):
        if self.steps and logs and "loss" in logs:
            self.steps.logged(state.global_step, logs)

    def on_train_end(self, args, state, control, **kw):
        if self.steps:
            self.steps.close()


class TrainLog(TrainerCallback):
    """Every logged step as one line of <run.dir>/train_log.jsonl (rank 0), with each rank's peak memory."""

    def __init__(self, layout: RunLayout, speed: Throughput):
        self.layout, self.speed = layout, speed

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or not state.is_world_process_zero:
            return
        rec = {"step": state.global_step, "time": round(time.time(), 3), **logs}
        if self.speed.memory_per_rank:
            rec["peak_memory_gb_per_rank"] = [round(m, 3) for m in self.speed.memory_per_rank]
        with open(self.layout.train_log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        tracking.log_step(rec)  # the same numbers to MLflow / W&B, where configured


# --------------------------------------------------------------------------- logs on resume


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint (they are trained again) and a torn last line (a kill or
    a full disk mid-append); step 0 = a fresh start."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().split("\n"):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            break
        if rec.get("step", 0) <= step:
            keep.append(ln + "\n")
    atomic.write_text(path, "".join(keep))


# --------------------------------------------------------------------------- the stage


class MedgenSFTTrainer(SFTTrainer):
    """SFTTrainer reading medgen's packed stream as it is, with LoRA+ as an option and, unless
    train.token_metrics, the loss without TRL's full-vocabulary metrics (medgen/lm_loss.py)."""

    def __init__(self, *args, stream: PackedStream, loraplus_ratio: float, token_metrics: bool, **kwargs):
        self.medgen_stream, self.loraplus_ratio, self.token_metrics = stream, loraplus_ratio, token_metrics
        self.finished = False  # resumed from the checkpoint of the last step: nothing left to train
        super().__init__(*args, **kwargs)
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        self.own_loss = not token_metrics and lm_loss.install(self.model, zero3)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.own_loss or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return lm_loss.loss(self, model, inputs, num_items_in_batch)

    def get_train_dataloader(self):
        # Not passed through accelerator.prepare: the stream already gives each rank its own blocks,
        # and a second split on top would lose data.
        # Its own generator: a DataLoader iterator draws a seed from the global RNG, which on resume
        # would shift the restored dropout RNG by one draw.
        # Finished: no blocks, else the Trainer takes one step past max_steps before it checks.
        blocks = _NoBlocks() if self.finished else self.medgen_stream
        return torch.utils.data.DataLoader(blocks, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                                           num_workers=0, pin_memory=torch.cuda.is_available(),
                                           generator=torch.Generator())

    def create_optimizer(self, model=None):
        if self.loraplus_ratio and self.optimizer is None:
            self.optimizer = loraplus_optimizer(self, self.model if model is None else model, self.loraplus_ratio)
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps, optimizer=None):
        fresh = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if fresh:  # the configured peak rates, before a checkpoint's state replaces them (medgen/schedule.py)
            self.configured_lrs = list(getattr(scheduler, "base_lrs", []))
        return scheduler


@dataclass
class TrainSetup:
    """Everything ``run`` needs from start-up: the trainer and what it was built from."""

    cfg: Config  # as run: the per-process batch and streams resolved (medgen/elastic.py)
    shape: elastic.Shape
    trainer: MedgenSFTTrainer
    stream: PackedStream
    collator: RecordingCollator
    tokenizer: Any
    precision: str  # resolved: bf16 | fp16 | fp32
    targets: list[str] | str  # the LoRA target modules
    validator: validate.Validator | None  # None: no validation during training
    split_tokens: int  # the training split as the stream reads it: its tokens plus one separator per article
    holds: dict[str, Any]  # the settings that fix what a checkpoint holds (_what_a_checkpoint_holds)


def build_trainer(cfg: Config) -> TrainSetup:
    from peft import LoraConfig

    if cfg.train.release_memory and not allocator.release_freed_memory():
        log.warning("train.release_memory: left to the allocator the environment chose (MALLOC_MMAP_THRESHOLD_, a "
                    "preloaded allocator, or no glibc)")
    tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    manifest = shards.read_manifest(cfg.shards_url, cfg.data.storage_options, cfg.data.retry_seconds)
    shards.check_tokenizer(manifest, models.tokenizer_fingerprint(tok), cfg.model.name_or_path, cfg.shards_url)
    holds = _what_a_checkpoint_holds(cfg, manifest)
    cfg, shape = _shape(cfg, manifest, holds)
    t = cfg.train
    precision = resolve_precision(t.precision)
    args = sft_config(cfg, precision)  # initialises the distributed state (accelerate)
    rank, world = args.process_index, args.world_size
    streams = shape.streams
    try:
        dataset = PackedStream(cfg.shards_url, manifest, cfg.data.storage_options, t.max_length, tok.eos_token_id,
                               t.packing, streams, rank, world, retry_seconds=cfg.data.retry_seconds)
    except ValueError as e:
        raise UserError(f"train: {e}") from None
    model = models.load_model(cfg.model.name_or_path, cfg.model.revision, torch.float32)
    if t.model_dropout is not None:  # before peft adds its own (lora.dropout) modules
        models.set_dropout(model, t.model_dropout)
    # training only (evaluate and generate run the model as published): the same numbers, fewer saved activations
    memory.fused_gelu(model)
    memory.fused_swiglu(model)
    targets, fan_in_fan_out = models.lora_targets(model, cfg.lora.target_modules, listed=bool(cfg.lora.top_layers))
    peft_config = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM",
        layers_to_transform=models.top_layers(model, cfg.lora.top_layers),
    )
    collator = RecordingCollator()
    # peft initialises LoRA A inside SFTTrainer's constructor: seed first, or every process and every
    # run starts from a different adapter
    from transformers import set_seed

    set_seed(t.seed)

    trainer = MedgenSFTTrainer(model=model, args=args, train_dataset=as_hf_iterable(dataset), processing_class=tok,
                               peft_config=peft_config, data_collator=collator, stream=dataset,
                               loraplus_ratio=t.loraplus_lr_ratio, token_metrics=t.token_metrics)
    for theirs in (PrinterCallback, ProgressCallback):  # medgen's ShowProgress instead (_add_callbacks)
        trainer.remove_callback(theirs)
    memory.shared_lora_input(trainer.model)  # the LoRA layers exist now
    if dist.deepspeed_requested(t.deepspeed) and not trainer.is_deepspeed_enabled:  # never plain DDP in its place
        raise UserError("train: DeepSpeed was asked for, but accelerate set up training without it")
    checker = validate.validator(cfg, manifest, tok.eos_token_id, rank, world, args.device)
    if checker:
        checker.window(model)
    split = manifest["splits"]["train"]
    return TrainSetup(cfg, shape, trainer, dataset, collator, tok, precision, targets, checker,
                      split["tokens"] + split["articles"], holds)


def _what_a_checkpoint_holds(cfg: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings that fix what a checkpoint holds (the base model, the adapter's shape, the data and its
    blocks): a resume with others is refused (Checkpoints.same_run), where the model would fail to load the
    adapter, or the streams would go on in another dataset."""
    m, lo, t = cfg.model, cfg.lora, cfg.train
    model = os.path.realpath(m.name_or_path) if os.path.isdir(m.name_or_path) else m.name_or_path  # one spelling
    return {"model.name_or_path": model, "model.revision": m.revision, "lora.r": lo.r, "lora.alpha": lo.alpha,
            "lora.target_modules": list(lo.target_modules), "lora.top_layers": lo.top_layers,
            "train.max_length": t.max_length, "train.packing": t.packing,
            "the prepared data (its manifest's config_hash)": manifest.get("config_hash")}


def _shape(cfg: Config, manifest: dict[str, Any], holds: dict[str, Any]) -> tuple[Config, elastic.Shape]:
    """The run's shape (medgen/elastic.py): from the newest checkpoint when resuming (refused where ``holds``,
    what it holds, differs), on this number of processes (the launcher's WORLD_SIZE, before the process group
    starts); ``cfg`` with it applied."""
    t, world = cfg.train, int(os.environ.get("WORLD_SIZE", "1"))
    newest = Checkpoints(cfg.layout.checkpoints, t.keep_checkpoints).newest()
    info = Checkpoints.info(newest) if newest else {}
    if newest is not None:
        Checkpoints.same_run(info.get("run"), holds, newest)
    if newest is None:
        shape = elastic.first_start(t, world, len(manifest["splits"]["train"]["shards"]))
    elif "shape" in info:
        shape = elastic.resumed(t, world, info["shape"], str(newest))
        note = elastic.describe_change(info["shape"], shape)
        if note and int(os.environ.get("RANK", "0")) == 0:
            log.info("%s", note)
    else:  # written before checkpoints recorded their shape
        shape = elastic.legacy(t, world, t.data_streams or Checkpoints.recorded_streams(newest) or world)
    return elastic.applied(cfg, shape), shape


def _tensorboard(cfg: Config, args) -> list:
    """TensorBoard in <run.dir>/tensorboard on the main process (transformers would read its directory from a
    process-wide environment variable)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    if not args.should_log:
        return []
    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(cfg.layout.tensorboard)))]


class _NoBlocks(torch.utils.data.IterableDataset):
    """A stream without length or blocks (a list would have length 0, which the Trainer divides by)."""

    def __iter__(self):
        return iter(())


def loraplus_optimizer(trainer, model, ratio: float) -> torch.optim.Optimizer:
    """The trainer's own optimizer class and settings, with lora_B in a group of its own at a higher rate."""
    t_args = trainer.args
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(t_args, model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    b = [p for n, p in trainable if ".lora_B." in n]
    rest = [p for n, p in trainable if ".lora_B." not in n]
    groups = [{"params": rest, "weight_decay": t_args.weight_decay},
              {"params": b, "weight_decay": t_args.weight_decay, "lr": t_args.learning_rate * ratio}]
    return cls(groups, **kwargs)


def run(cfg: Config) -> dict[str, Any]:
    setup = build_trainer(cfg)
    cfg, t = setup.cfg, setup.cfg.train
    trainer, args = setup.trainer, setup.trainer.args
    checkpoints = Checkpoints(Path(args.output_dir), t.keep_checkpoints)
    resume = checkpoints.newest()
    info = Checkpoints.info(resume) if resume else {}  # what its commit recorded (medgen/checkpoint.py)
    vstate = validate.State.from_dict(info.get("validation")) \
        if setup.validator else None
    signals = Signals()
    stop = _add_callbacks(cfg, setup, checkpoints, signals, vstate)
    _resume(cfg, setup, checkpoints, resume, info, stopped=bool(vstate and vstate.stopped))
    signals.install()
    try:
        result = _train(trainer, resume, Path(cfg.run.dir), checkpoints)
    finally:
        signals.uninstall()
    if stop.preempted:
        raise Preempted(f"train: stopped by a signal ({signals.received or 'sent to another rank'}) at step "
                        f"{trainer.state.global_step}; "
                        f"checkpoint saved in {checkpoints.directory}; rerun the same command to resume")
    step, why = _final_adapter(cfg, trainer, checkpoints, vstate)
    watchdog.progress("save adapter")
    adapter_dir = cfg.layout.adapter
    _save_atomic(trainer, adapter_dir, lambda tmp: provenance.write(
        cfg, "train", tmp, precision=setup.precision, compiled=args.torch_compile, world_size=args.world_size,
        data_streams=setup.shape.streams, lora_targets=setup.targets, tokens_per_step=_tokens_per_step(cfg, args.world_size),
        tokenizer_fingerprint=models.tokenizer_fingerprint(setup.tokenizer),
        adapter_fingerprint=models.adapter_fingerprint(tmp), steps=trainer.state.global_step, adapter_step=step,
        adapter_choice=why, stopped=(vstate.stopped if vstate else "") or "train.max_steps reached",
        malloc=allocator.loaded() or "system",
        validation=_validation_record(setup.validator, vstate, step)))
    if t.merge and trainer.is_world_process_zero():
        _save_merged(cfg, adapter_dir, setup.tokenizer, cfg.layout.merged)
    trainer.accelerator.wait_for_everyone()
    # the Trainer's mean loss of this call's steps; none when a finished run was started again
    return {"train_loss": None if trainer.finished else result.training_loss, "steps": result.global_step, "precision": setup.precision,
            "adapter": str(adapter_dir), "adapter_step": step}


def _final_adapter(cfg: Config, trainer, checkpoints: Checkpoints, vstate: validate.State | None) -> tuple[int, str]:
    """(step, why) of the adapter to save: the best validation step's weights loaded back from its checkpoint
    (train.final_adapter=best), else the last step's, which the model holds."""
    last = trainer.state.global_step
    if not vstate or cfg.train.final_adapter == "last" or not vstate.best_step:
        return last, "last step" + ("" if vstate else " (no validation)")
    if vstate.best_step == last:
        return last, "best validation loss (the last step)"
    best = checkpoints.at(vstate.best_step)
    if best is None:
        raise UserError(f"train.final_adapter=best: the checkpoint of the best step {vstate.best_step} is missing "
                        f"from {checkpoints.directory}; rerun with train.final_adapter=last, or start over")
    trainer.state.best_model_checkpoint = str(best)
    trainer._load_best_model()  # the Trainer's own loader: PEFT adapters, DeepSpeed checkpoints
    if trainer.is_world_process_zero():
        log.info("train: the adapter is step %d's, the best validation loss (%.4f), not the last step %d's",
                 vstate.best_step, vstate.best_loss, last)
    return vstate.best_step, "best validation loss"


def _validation_record(checker: validate.Validator | None, vstate: validate.State | None, step: int) -> dict:
    """The validation score of the saved adapter, and what was scored."""
    if not checker or not vstate or not vstate.last:
        return {}
    loss = vstate.best_loss if step == vstate.best_step else vstate.last["eval_loss"]
    return {"step": step, "loss": loss, "perplexity": math.exp(loss), "articles": len(checker.articles),
            "tokens": vstate.last["eval_tokens"], "best_step": vstate.best_step, "context": checker.context,
            "stride": checker.stride, "every": checker.plan.every, "chosen": checker.plan.why}


def _tokens_per_step(cfg: Config, world_size: int) -> int:
    t = cfg.train
    return t.batch_size * t.grad_accum * t.max_length * world_size


def _add_callbacks(cfg: Config, setup: TrainSetup, checkpoints: Checkpoints, signals: Signals,
                   vstate: validate.State | None) -> StopOnSignal:
    """medgen's callbacks, one job each, in the order they must run; returns the one that knows of a stop."""
    trainer, args = setup.trainer, setup.trainer.args
    stop = StopOnSignal(signals)
    checking = [validate.Validate(cfg, setup.validator, vstate, trainer)] if setup.validator else []
    rate = Throughput(_tokens_per_step(cfg, args.world_size), throughput.flops_per_token(trainer.model, cfg.train.max_length),
                      throughput.device_peak(args.device, setup.precision), setup.split_tokens)
    # the log lines, the train log and TensorBoard after Throughput: they see what it adds to the logs
    for cb in (MarkProgress(), SampleLog(cfg.layout, setup.collator), *checking, stop,
               CommitCheckpoint(checkpoints, setup.stream, vstate, {
                   "shape": setup.shape.as_dict(), "schedule": schedule.record(cfg.train), "run": setup.holds}),
               schedule.ReapplySchedule(trainer),
               rate, ShowProgress(), TrainLog(cfg.layout, rate), *_tensorboard(cfg, args)):
        trainer.add_callback(cb)
    return stop


def _resume(cfg: Config, setup: TrainSetup, checkpoints: Checkpoints, resume: Path | None, info: dict[str, Any],
            stopped: bool) -> None:
    """From the newest complete checkpoint (None: a fresh start; ``info``: what its commit recorded): the streams'
    positions restored, the logs cut back to its step, a partial checkpoint of a killed run removed; nothing left
    to train once max_steps or an early stop was reached."""
    t, trainer, stream = cfg.train, setup.trainer, setup.stream
    args = trainer.args
    if resume:
        stream.load_state_dict(checkpoints.stream_state(resume, stream.num_streams, stream.stream_ids,
                                                        args.world_size))
    resumed_step = checkpoints.step(resume) if resume else 0
    trainer.finished = resumed_step >= t.max_steps or stopped
    _truncate_log(cfg.layout.samples_of(args.process_index), resumed_step)
    if trainer.is_world_process_zero():
        _truncate_log(cfg.layout.train_log, resumed_step)
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        checkpoints.remove_partial()
        log.info("train: %s + LoRA r=%d on %s, %s, %d steps x %d tokens, %s, %d data streams, "
                 "%.0f MFLOP per token%s", cfg.model.name_or_path, cfg.lora.r, setup.targets,
                 setup.precision + (", compiled" if args.torch_compile else ""),
                 t.max_steps, _tokens_per_step(cfg, args.world_size),
                 "1 process" if args.world_size == 1 else f"{args.world_size} processes", setup.shape.streams,
                 throughput.flops_per_token(trainer.model, t.max_length) / 1e6,
                 f", resuming from {resume}" if resume else "")
        note = resume and schedule.describe_change(info.get("schedule"), t, resumed_step)
        if note:
            log.info("%s", note)
        elif trainer.finished and not stopped:
            log.info("train: the run already trained its %d steps: nothing left to train, the adapter is saved again "
                     "(raise train.max_steps to train on)", resumed_step)
        if setup.validator:
            v = setup.validator
            log.info("train: validating every %d steps on %d validation articles (%d tokens), context %d, stride %d: %s",
                     v.plan.every, len(v.articles), sum(len(a["input_ids"]) for a in v.articles), v.context,
                     v.stride, v.plan.why)


def _train(trainer, resume: Path | None, run_dir: Path, checkpoints: Checkpoints):
    """trainer.train; a full disk is one line: the checkpoint being written is never committed (it is
    removed, freeing its space), the last complete one stays and a rerun resumes from it. A step that does not
    fit in memory is one line too, with the settings that make it fit."""
    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as e:
        if memory.is_out_of_memory(e):
            last = checkpoints.newest()
            kept = f"a rerun resumes from {last}" if last else "no checkpoint was written"
            raise UserError(memory.training_out_of_memory(trainer.args, kept)) from None
        partial = checkpoints.partial(trainer.state.global_step)
        where = partial if partial.exists() else Path(getattr(e, "filename", None) or run_dir)
        if isinstance(e, UserError) or not storage.is_no_space(e, where):
            raise
        last = checkpoints.newest()
        if trainer.is_world_process_zero():
            shutil.rmtree(partial, ignore_errors=True)
        kept = f"training resumes from {last}" if last else "no complete checkpoint yet: training starts over"
        raise storage.no_space(where, "a checkpoint" if where == partial else "the training logs", kept) from None


def _save_atomic(trainer, target: Path, add: Callable[[Path], Any]) -> None:
    """All ranks take part (ZeRO-3 gathers the adapter); rank 0 adds its record (``add``) and puts the finished
    directory in place."""
    tmp = target.with_name(f".{target.name}.tmp")  # one name all ranks know
    rank0 = trainer.is_world_process_zero()
    with storage.disk_errors(target, "the adapter", "the previous adapter, if any, is kept"):
        try:
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)
            trainer.accelerator.wait_for_everyone()
            trainer.save_model(str(tmp))
            trainer.accelerator.wait_for_everyone()
            if rank0:
                for extra in ("training_args.bin", "README.md"):
                    (tmp / extra).unlink(missing_ok=True)
                add(tmp)
                atomic.commit_dir(tmp, target)
        finally:
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)


def _save_merged(cfg: Config, adapter_dir: Path, tok, target: Path) -> None:
    """Base + the saved adapter, merged (rank 0). From the files, not the training model: under ZeRO-3 that
    holds only this rank's shards of every weight, and merging it saved empty tensors."""
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # training is over: load the base whole, not sharded by ZeRO-3's zero.Init
    base = models.load_model(cfg.model.name_or_path, cfg.model.revision, torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    # the tokenizer saved beside it pads with eos; the config says so, as it did during training
    merged.config.pad_token_id = merged.generation_config.pad_token_id = tok.pad_token_id
    with storage.disk_errors(target, "the merged model", "the previous merged model, if any, is kept"), \
            atomic.directory(target) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
