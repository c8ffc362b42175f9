"""The config schema: one dataclass per section, every field with its default, one-line help and limits.

A field's limits are declared on it (``opt(..., gt=0)``, ``ge``, ``lt``, ``le``, ``nonempty``) and checked by
``field_problems`` in one place; checks that need more than one field are each section's ``problems()``.
A field whose default is chosen for the machine at run time says so with ``auto=<that default>``: the
shipped configs leave those alone (tests/test_configs.py). Loading YAML and overrides: medgen/config/load.py;
the reference in the README: medgen/config/doc.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

from medgen.layout import RunLayout
from medgen.logs import DEFAULT_EVERY

ASSETS = resources.files("medgen") / "assets"
DEMO_ARTICLES = str(ASSETS / "demo" / "articles.csv")
DEMO_PROMPTS = str(ASSETS / "demo" / "prompts.jsonl")
STAGES = ("prepare", "train", "evaluate", "generate", "report")  # pipeline order
LIMITS = ("gt", "ge", "lt", "le")


def opt(default: Any, help: str, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
        le: float | None = None, nonempty: bool = False, auto: Any = None) -> Any:
    """A config field: its default, the one-line help shown by ``medgen config --doc``, its limits, and
    ``auto``: the default value that means "chosen for the machine at run time" (None: not such a field)."""
    meta = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le, "nonempty": nonempty, "auto": auto}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def limit_text(m: dict, optional: bool = False) -> str:
    lo = f"[{m['ge']}" if m["ge"] is not None else f"({m['gt']}" if m["gt"] is not None else None
    hi = f"{m['le']}]" if m["le"] is not None else f"{m['lt']})" if m["lt"] is not None else None
    if lo and hi:
        text = f"must be in {lo}, {hi}"
    elif lo:
        text = f"must be {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    else:
        text = f"must be {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return text + (" or null" if optional else "")


def _within(value: Any, m: dict) -> bool:
    return ((m["gt"] is None or value > m["gt"]) and (m["ge"] is None or value >= m["ge"])
            and (m["lt"] is None or value < m["lt"]) and (m["le"] is None or value <= m["le"]))


def field_problems(obj: Any, prefix: str) -> list[str]:
    """Every field of the config dataclass ``obj`` (and of the sections in it) outside its declared limits."""
    p: list[str] = []
    for f in dataclasses.fields(obj):
        value, m = getattr(obj, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            p += field_problems(value, f"{prefix}{f.name}.")
        elif m.get("nonempty") and not value:
            p.append(f"{prefix}{f.name}: must not be empty")
        elif value is not None and any(m.get(k) is not None for k in LIMITS) and not _within(value, m):
            optional = type(None) in typing.get_args(typing.get_type_hints(type(obj))[f.name])
            p.append(f"{prefix}{f.name}: {limit_text(m, optional)} (got {value})")
    return p


@dataclass
class RunConfig:
    dir: str = opt("runs/demo", "Run directory: adapter, checkpoints, eval, generations and report go here.",
                   nonempty=True)
    name: str = opt("demo", "A name for this run, used in logs and job names.")
    hang_timeout: float = opt(
        900.0, "Seconds without progress on any rank after which train/evaluate/generate is declared hung: stacks and a "
        "report in <run.dir>/hang, then exit 75 (SLURM: requeued, resumes from the last checkpoint). Longer than "
        "data.retry_seconds and a step; 0 = no watchdog (docs/reliability.md).", ge=0,
    )
    start_timeout: float = opt(
        1800.0, "The same before a stage's first progress: model loading and the first (maybe compiled) step.", gt=0,
    )
    allocator: Literal["auto", "jemalloc", "system"] = opt(
        "auto", "malloc of train/evaluate/generate/run/sweep processes: auto = jemalloc where found (the process starts "
        "again with it preloaded), else the system's and a warning; jemalloc = an error where not found; system = "
        "never preloaded. On a CPU, jemalloc halves a training step's peak memory, faster (medgen/allocator.py).",
    )
    progress_every: float = opt(
        DEFAULT_EVERY, "Seconds between the progress lines of prepare, evaluate, validation and generate where "
        "stderr is not a terminal (a SLURM job log, a pipe; docs/slurm.md); on a terminal a progress bar instead. "
        "Training logs a line per logged step (train.logging_steps).",
        ge=0.1, le=3600,
    )


@dataclass
class DataConfig:
    source: str | list[str] = opt(
        DEMO_ARTICLES, "Raw articles CSV, any fsspec URL (local path, file://, s3://); or a glob (files in name order) "
        "or a list of URLs/globs, read in that order as one corpus."
    )
    shards: str = opt("", "Shard dataset URL (manifest.json + Parquet); empty means <run.dir>/data.")
    num_shards: int = opt(2, "Parquet shards per split; use a multiple of the number of training ranks.", gt=0)
    title_column: str = opt("title", "CSV column with the article title ('' if there is none).")
    text_column: str = opt("text", "CSV column with the article body.", nonempty=True)
    url_column: str = opt("url", "CSV column with the article URL ('' if none; ids then hash title+text).")
    tags_column: str = opt("tags", "CSV column with a Python-list string of tags ('' if none).")
    authors_column: str = opt("authors", "CSV column with a Python-list string of authors ('' if none).")
    timestamp_column: str = opt("timestamp", "CSV column with an ISO-8601 timestamp ('' if none).")
    chunk_rows: int = opt(500, "Rows read per CSV chunk; memory stays flat whatever the file size.", gt=0)
    workers: int = opt(
        0, "Processes for the per-article work (cleaning, language ID, MinHash, tokenizing); 0 = every CPU this "
        "process may use (in a SLURM job: the profile's cpus_per_task). The output is the same for any number.",
        ge=0, auto=0,
    )
    clean_rules: list[str] = opt(
        ["html", "image_credits", "urls", "emails", "mentions", "emoji", "special_chars", "whitespace"],
        "Cleaning rules, applied in this order (see docs/data.md for what each removes).",
    )
    min_chars: int = opt(200, "Drop articles whose cleaned text is shorter than this.", ge=0)
    max_chars: int = opt(200_000, "Drop articles whose cleaned text is longer than this.", gt=0)
    languages: list[str] = opt(["en"], "Keep only articles in these languages (ISO 639-1 codes, py3langid); [] = no language filter.")
    near_dup_threshold: float = opt(
        0.8, "Near-duplicate cut-off: word 5-gram Jaccard similarity to an earlier article (MinHash LSH, an S-curve "
        "around it: see docs/data.md); 0 = off.", ge=0, le=1,
    )
    near_dup_num_perm: int = opt(128, "MinHash permutations for near-duplicate detection (more: sharper threshold, slower, more memory).",
                                 ge=2)
    val_fraction: float = opt(0.1, "Fraction of articles in the validation split (by hash of the article id).", ge=0, lt=1)
    test_fraction: float = opt(0.1, "Fraction of articles in the test split (by hash of the article id).", ge=0, lt=1)
    storage_options: dict[str, Any] = opt({}, "Extra fsspec storage options (never credentials: use the environment).")
    retry_seconds: float = opt(
        300.0, "How long object-store I/O retries an outage (refused, reset, timeout, 5xx, throttling), backing off "
        "0.5 s doubling to 15 s; then exit 75 (rerun once the store is back). 0 = fail at once. A store that never "
        "answered is not an outage: that fails at once.", ge=0,
    )

    def problems(self) -> list[str]:
        p = []
        if self.min_chars > self.max_chars:
            p.append(f"data.min_chars: must be <= data.max_chars ({self.min_chars} > {self.max_chars})")
        if self.val_fraction + self.test_fraction >= 1.0:
            p.append("data.val_fraction + data.test_fraction: must leave some articles for training")
        if isinstance(self.source, list) and not self.source:
            p.append("data.source: an empty list; name at least one CSV file")
        p += [f"data.storage_options.{k}: credentials do not belong in a config (it is copied into run folders "
              f"and SLURM jobs); set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) "
              f"or use a profile" for k in credential_keys(self.storage_options)]
        return p


@dataclass
class ModelConfig:
    name_or_path: str = opt(
        "smollm2-135m",
        "Base model: hub id (gpt2), local directory, or a built-in: smollm2-135m, tiny-gpt2.",
    )
    revision: str = opt("", "Hub revision (branch, tag or commit); '' for the default.")
    base_only: bool = opt(False, "evaluate and generate use the base model alone, whatever run.dir holds. Without it "
                          "they refuse a run.dir with no adapter: a mistyped run.dir is an error, not a base-model run.")


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank.", gt=0)
    alpha: int = opt(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = opt(
        0.0, "LoRA dropout. 0 as in peft and torchtune: peft then skips a dropout copy of every adapted layer's "
        "input (steps 23% faster on CPU, bench/RESULTS.md); 0.05-0.1 against overfitting many epochs of little data.",
        ge=0, lt=1,
    )
    target_modules: list[str] = opt([], "Modules to adapt; empty = architecture default (GPT-2: c_attn, c_proj, c_fc).")
    top_layers: int = opt(
        0, "Adapt only the top N transformer blocks (0 = all). Backward then stops at the lowest adapted block: "
        "fewer FLOPs per token, at some cost in what the adapter can learn.", ge=0,
    )


@dataclass
class TrainConfig:
    max_steps: int = opt(30, "Optimizer steps to train.", gt=0)
    seed: int = opt(42, "Seed for LoRA init, dropout and data order.")
    save_steps: int = opt(0, "Checkpoint every N steps and at the last one (0 = the last one only, and wherever a stop "
                          "signal arrives); a finished run resumes from its last step when max_steps is raised.", ge=0)
    batch_size: int = opt(4, "Sequences per device per micro-batch.", gt=0)
    grad_accum: int = opt(1, "Gradient accumulation steps.", gt=0)
    max_length: int = opt(256, "Tokens per packed training sequence.", gt=0)
    learning_rate: float = opt(5e-4, "Peak learning rate.")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule (any transformers SchedulerType).")
    warmup_steps: int = opt(3, "Linear warm-up steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    loraplus_lr_ratio: float = opt(
        0.0, "LoRA+ (Hayou et al. 2024): the B matrices learn at ratio x learning_rate, A at learning_rate; "
        "0 = plain LoRA (one rate).", ge=0,
    )
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "auto = bf16 where the hardware has fast bf16 (CUDA, or a CPU with avx512_bf16/AMX), else fp32.",
        auto="auto",
    )
    compile: Literal["auto"] | bool = opt(
        "auto", "torch.compile the model being trained: auto = on a GPU without DeepSpeed (1.45x tokens/s measured on "
        "an H100), not on a CPU (slower there: bench/RESULTS.md); losses change in the last digits (fused kernels).",
        auto="auto",
    )
    packing: Literal["wrapped", "documents"] = opt(
        "wrapped", "wrapped: documents joined with eos and cut anywhere; documents: position ids restart per document."
    )
    data_streams: int = opt(
        0, "Data streams, the sample order (0 = one per training shard, a multiple of the processes, at most 64); "
        "fixed at a run's first start: a resume on another number of processes keeps it (medgen/elastic.py).",
        ge=0, auto=0,
    )
    keep_checkpoints: int = opt(2, "Complete checkpoints kept in <run.dir>/checkpoints (newest first).", gt=0)
    deepspeed: str = opt("", "DeepSpeed config JSON (e.g. configs/deepspeed/zero2.json); '' = plain DDP.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward (saves memory, costs ~30% speed).")
    release_memory: bool = opt(False, "CPU, on the system's malloc (run.allocator=system or no jemalloc): give memory "
                               "the step frees back at once (glibc's mmap threshold fixed at 1 MiB): the peak "
                               "resident memory is what is live, every step slower by its page faults "
                               "(medgen/allocator.py).")
    model_dropout: Optional[float] = opt(
        0.0, "Dropout inside the frozen base model while fine-tuning (GPT-2 ships 0.1); null keeps the model's own. "
        "0 as in torchtune and litgpt: attention runs fused and no random mask is drawn (bench/RESULTS.md); "
        "lora.dropout regularises the adapter where wanted.", ge=0, lt=1,
    )
    logging_steps: int = opt(1, "Log the loss, grad norm, lr, tokens/s, MFU and peak memory every N steps: a line in "
                             "the log (on a terminal above a bar of the steps), train_log.jsonl, TensorBoard, trackers.",
                             gt=0)
    token_metrics: bool = opt(False, "Also log TRL's entropy and mean_token_accuracy: a pass over the full vocabulary "
                              "and three collectives plus a host sync every micro-batch (medgen/lm_loss.py); the loss "
                              "and the adapter are the same either way.")
    validate: bool = opt(True, "Score the validation split during training (evaluate's exact method, eval.context/"
                         "stride/batch_size): validation loss and perplexity in the train log, TensorBoard and report.")
    eval_steps: int = opt(0, "Validate every N optimizer steps and at the last one; 0 = 5 times per run, fewer where "
                          "one validation article costs more than the budget of eval_tokens=0 allows.", ge=0)
    eval_tokens: int = opt(0, "Validation articles scored each time: the first ones (manifest order) with this many "
                           "tokens in all (at least one); 0 = as many as keep the run's validation within 4% of "
                           "its training cost (medgen/validate.py).", ge=0)
    early_stopping_patience: int = opt(0, "Stop after this many evaluations in a row without a validation loss "
                                       "lower than the best by more than early_stopping_min_delta (0 = never).", ge=0)
    early_stopping_min_delta: float = opt(0.0, "The improvement in validation loss (nats per token) that counts.", ge=0)
    final_adapter: Literal["best", "last"] = opt(
        "best", "The adapter training leaves in <run.dir>/adapter: the step with the best validation loss (its "
        "checkpoint is never rotated away), or the last step. best: with early stopping the last step is by "
        "construction past the best; without validation the two are the same.")
    merge: bool = opt(False, "Also save the merged model (base + adapter) as safetensors in <run.dir>/merged.")
    sft_args: dict[str, Any] = opt({}, "Pass-through for any other trl.SFTConfig field (not those medgen sets itself: "
                                   "validate names them).")

    def problems(self) -> list[str]:
        if self.deepspeed and not os.path.isfile(self.deepspeed):
            return [f"train.deepspeed: file not found: {self.deepspeed}"]
        return []


@dataclass
class EvalConfig:
    split: Literal["train", "validation", "test"] = opt("test", "Split to score.")
    batch_size: int = opt(8, "Windows per forward pass (does not change the result).", gt=0)
    context: int = opt(512, "Window length in tokens (capped at the model's maximum).", gt=0)
    stride: int = opt(256, "Sliding-window stride (< context): each token keeps at least context-stride tokens of history.",
                      gt=0)
    dtype: Literal["float32", "bfloat16"] = opt("float32", "Compute dtype for scoring.")
    max_articles: int = opt(0, "Score only the first N articles of the split, in manifest order (0 = all).", ge=0)
    bootstrap: int = opt(1000, "Bootstrap resamples (over articles) for the 95% intervals.", ge=2)
    seed: int = opt(0, "Bootstrap seed: the intervals are a function of the articles and this seed alone.")
    top_tags: int = opt(10, "Per-tag perplexity for this many most frequent tags (0 = none).", ge=0)
    threads: int = opt(0, "CPU threads per process (0 = the cores this process may use / processes on the node).",
                       ge=0, auto=0)
    merge_tolerance: float = opt(1e-4, "Score the tuned model with the adapter merged into the weights if merged logits "
                                 "match unmerged within this (relative; metrics.json says which); 0 = never.", ge=0)

    def problems(self) -> list[str]:
        if self.stride >= self.context:
            return [f"eval.stride: must be < eval.context ({self.stride} >= {self.context})"]
        return []


@dataclass
class GenerateConfig:
    prompts: str = opt(DEMO_PROMPTS, "Prompts: JSONL with id/prompt, OpenAI batch input lines (custom_id/method/url/body), "
                       "or text with one prompt per line (any fsspec URL); '-' = stdin.")
    format: Literal["medgen", "openai-batch"] = opt(
        "medgen", "Output: medgen's records (generations.jsonl) only, or also OpenAI batch output lines, one per "
        "custom_id, in generations/batch_output.jsonl (docs/generate.md).")
    max_new_tokens: int = opt(48, "New tokens per completion (at most).", gt=0)
    min_new_tokens: int = opt(0, "Suppress end-of-text until this many new tokens (0 = off; benchmarks force full length).")
    do_sample: bool = opt(False, "Sample (true) or greedy (false).")
    temperature: float = opt(0.8, "Sampling temperature (> 0 when sampling).")
    top_p: float = opt(0.95, "Nucleus sampling threshold (1.0 = off).", gt=0, le=1)
    top_k: int = opt(50, "Top-k sampling (0 = off).", ge=0)
    repetition_penalty: float = opt(1.0, "Repetition penalty (1.0 = off).", gt=0)
    stop: list[str] = opt([], "Stop strings: a completion ends before the first one it contains (finish_reason stop).")
    num_samples: int = opt(1, "Completions per prompt, one line each with its 'sample' index; > 1 needs do_sample.", gt=0)
    batch_size: int = opt(0, "Prompts per generate() call; 0 = for the device: 64 on a CPU, on a GPU what half its free "
                          "memory holds as KV cache (at most 256); a batch that does not fit is halved until one does. Does not change "
                          "the output in float32.", ge=0, auto=0)
    seed: int = opt(0, "Sampling seed; each (id, sample) has its own random stream, so batching does not matter.")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "Compute dtype; float32 keeps greedy output identical across batch sizes and ranks.")
    judge: str = opt("", "Model that scores completions for fluency and relevance (medgen/judge.py): '' = the base "
                     "model; or a hub id, local directory or built-in.")
    judge_prompts: int = opt(16, "Score the completions of the first N prompts with the judge (0 = none); the report "
                             "compares base and tuned on them.", ge=0)
    base_prompts: int = opt(16, "Also complete the first N prompts with the base model (adapter off) into "
                            "generations/base.jsonl: the report compares the two on the same prompts (0 = none).", ge=0)
    merge_tolerance: float = opt(1e-4, "Merge the adapter into the weights if merged logits match unmerged within this (relative); 0 = never.",
                                 ge=0)

    def problems(self) -> list[str]:
        p: list[str] = []
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            p.append(f"generate.min_new_tokens: must be in [0, generate.max_new_tokens] (got {self.min_new_tokens})")
        if self.num_samples > 1 and not self.do_sample:
            p.append("generate.num_samples: > 1 needs generate.do_sample=true (greedy samples would all be equal)")
        if self.do_sample and self.temperature <= 0:
            p.append(f"generate.temperature: must be > 0 when sampling (got {self.temperature})")
        if any(not s for s in self.stop):
            p.append("generate.stop: stop strings must not be empty")
        return p


@dataclass
class SlurmConfig:
    profile: str = opt("local", "Cluster profile: a name (a built-in: local, local-gpu, gpu-example; or a YAML file in "
                       "slurm.profile_dir) or a YAML path.")
    profile_dir: str = opt("", "Directory of your own profiles, searched for a bare slurm.profile name before the built-in ones.")
    nodes: int = opt(0, "Nodes for train, evaluate and generate (0 = the profile's).", ge=0)
    min_nodes: int = opt(0, "Let train, evaluate and generate start on as few as this many nodes when no more are free "
                         "(a requeued job that lost a node goes on without it; training keeps its data order and "
                         "global batch); 0 = the profile's (all nodes).", ge=0)
    timeout_min: int = opt(0, "Time limit of each stage's job in minutes (0 = the profile's).", ge=0)
    signal_delay_s: int = opt(
        90, "USR2 this long before the time limit: train checkpoints, the job is requeued (< time limit - 60 s).", ge=0,
    )
    max_requeues: int = opt(3, "Time limits a stage may hit (each one requeues it) before it fails.", ge=0)
    folder: str = opt("", "Job scripts, pickles and logs; '' = <run.dir>/slurm (a fresh subfolder per submission).")
    stages: list[str] = opt(list(STAGES), "Stages to submit, in pipeline order; each starts once the previous succeeded.")
    array_parallelism: int = opt(0, "Sweeps: array elements (grid points) running at once per stage, sbatch --array=...%k "
                                 "(0 = the profile's).", ge=0)

    def problems(self) -> list[str]:
        """Stage names; the profile and paths are checked when a chain is built (medgen/launch/slurm.py)."""
        unknown = [x for x in self.stages if x not in STAGES]
        if unknown:
            return [f"slurm.stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})"]
        if not self.stages or self.stages != sorted(set(self.stages), key=STAGES.index):
            return [f"slurm.stages: must list stages once each, in pipeline order ({', '.join(STAGES)})"]
        if self.nodes and self.min_nodes > self.nodes:
            return [f"slurm.min_nodes: must be <= slurm.nodes ({self.min_nodes} > {self.nodes})"]
        return []


@dataclass
class SweepConfig:
    grid: dict[str, Any] = opt({}, "medgen sweep: dotted key -> list of values; every combination is one run under "
                               "run.dir (e.g. {lora.r: [8, 16], train.learning_rate: [5e-4, 1e-3]}).")


@dataclass
class TrackingConfig:
    to: list[str] = opt([], "Experiment trackers beside TensorBoard (always on): any of mlflow, wandb. Rank 0 reports "
                        "config, curves, metrics and outputs; a resumed or requeued run continues its own tracker run "
                        "(<run.dir>/tracking.json). Needs pip install 'medgen[tracking]' (docs/tracking.md).")
    experiment: str = opt("medgen", "MLflow experiment / W&B project.", nonempty=True)
    mlflow_uri: str = opt("", "MLflow tracking URI; '' = $MLFLOW_TRACKING_URI, else sqlite:///<run.dir>/../mlflow.db "
                          "(runs of one folder, a sweep's points, share it). A server: http://login-node:5000.")
    wandb_mode: Literal["offline", "online"] = opt(
        "offline", "offline: W&B writes <run.dir>/wandb and never touches the network; `wandb sync` uploads it later. "
        "online needs a network on the compute nodes and WANDB_API_KEY in the environment.")
    wandb_entity: str = opt("", "W&B entity (user or team); '' = your API key's default.")
    artifacts: bool = opt(True, "Also upload the stages' outputs: resolved configs, metrics.json, generations, report.")

    def problems(self) -> list[str]:
        unknown = [x for x in self.to if x not in ("mlflow", "wandb")]
        if unknown:
            return [f"tracking.to: unknown tracker(s) {', '.join(map(str, unknown))} (known: mlflow, wandb; "
                    "TensorBoard is always on)"]
        if len(set(self.to)) != len(self.to):
            return ["tracking.to: list each tracker once"]
        return []


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def layout(self) -> RunLayout:
        """Where each stage's outputs live in run.dir."""
        return RunLayout(Path(self.run.dir))

    @property
    def shards_url(self) -> str:
        return self.data.shards or os.path.join(self.run.dir, "data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def problems(self) -> list[str]:
        """Every field outside its limits, then every section's own cross-field problems."""
        p = field_problems(self, "")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            p += section.problems() if hasattr(section, "problems") else []
        if 0 < self.run.hang_timeout <= self.data.retry_seconds:  # an outage the job rides out is not a hang
            p.append(f"run.hang_timeout: must be longer than data.retry_seconds ({self.run.hang_timeout:g} <= "
                     f"{self.data.retry_seconds:g}), or 0 for no watchdog")
        return p


CREDENTIAL_KEYS = {"key", "secret", "token", "password", "access_key", "secret_key", "session_token",
                   "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key",
                   "sas_token", "connection_string", "client_secret", "credentials"}


def credential_keys(options: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the keys in ``options`` (nested too) that would hold a credential."""
    found = []
    for k, v in options.items():
        if str(k).lower() in CREDENTIAL_KEYS:
            found.append(f"{prefix}{k}")
        elif isinstance(v, dict):
            found += credential_keys(v, f"{prefix}{k}.")
    return found
