"""The one typed config: dataclasses that are also the CLI (``section.key=value`` overrides).

Every field has a default and a one-line help. Loading reports every problem at once.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from medgen.errors import ConfigError
from medgen.layout import RunLayout

ASSETS = resources.files("medgen") / "assets"
DEMO_ARTICLES = str(ASSETS / "demo" / "articles.csv")
DEMO_PROMPTS = str(ASSETS / "demo" / "prompts.jsonl")
STAGES = ("prepare", "train", "evaluate", "generate", "report")  # pipeline order


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its default and the one-line help shown by ``medgen config --doc``."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    dir: str = opt("runs/demo", "Run directory: adapter, checkpoints, eval, generations and report go here.")
    name: str = opt("demo", "A name for this run, used in logs and job names.")


@dataclass
class DataConfig:
    source: str | list[str] = opt(
        DEMO_ARTICLES, "Raw articles CSV, any fsspec URL (local path, file://, s3://); or a glob (files in name order) "
        "or a list of URLs/globs, read in that order as one corpus."
    )
    shards: str = opt("", "Shard dataset URL (manifest.json + Parquet); empty means <run.dir>/data.")
    num_shards: int = opt(2, "Parquet shards per split; use a multiple of the number of training ranks.")
    title_column: str = opt("title", "CSV column with the article title ('' if there is none).")
    text_column: str = opt("text", "CSV column with the article body.")
    url_column: str = opt("url", "CSV column with the article URL ('' if none; ids then hash title+text).")
    tags_column: str = opt("tags", "CSV column with a Python-list string of tags ('' if none).")
    authors_column: str = opt("authors", "CSV column with a Python-list string of authors ('' if none).")
    timestamp_column: str = opt("timestamp", "CSV column with an ISO-8601 timestamp ('' if none).")
    chunk_rows: int = opt(500, "Rows read per CSV chunk; memory stays flat whatever the file size.")
    workers: int = opt(
        0, "Processes for the per-article work (cleaning, language ID, MinHash, tokenizing); 0 = every CPU this "
        "process may use (in a SLURM job: the profile's cpus_per_task). The output is the same for any number."
    )
    clean_rules: list[str] = opt(
        ["html", "image_credits", "urls", "emails", "mentions", "emoji", "special_chars", "whitespace"],
        "Cleaning rules, applied in this order (see docs/data.md for what each removes).",
    )
    min_chars: int = opt(200, "Drop articles whose cleaned text is shorter than this.")
    max_chars: int = opt(200_000, "Drop articles whose cleaned text is longer than this.")
    languages: list[str] = opt(["en"], "Keep only articles in these languages (ISO 639-1 codes, py3langid); [] = no language filter.")
    near_dup_threshold: float = opt(
        0.8, "Near-duplicate cut-off: word 5-gram Jaccard similarity to an earlier article (MinHash LSH, an S-curve "
        "around it: see docs/data.md); 0 = off."
    )
    near_dup_num_perm: int = opt(128, "MinHash permutations for near-duplicate detection (more: sharper threshold, slower, more memory).")
    val_fraction: float = opt(0.1, "Fraction of articles in the validation split (by hash of the article id).")
    test_fraction: float = opt(0.1, "Fraction of articles in the test split (by hash of the article id).")
    storage_options: dict[str, Any] = opt({}, "Extra fsspec storage options (never credentials: use the environment).")
    retry_seconds: float = opt(
        300.0, "How long object-store I/O retries an outage (refused, reset, timeout, 5xx, throttling), backing off "
        "0.5 s doubling to 15 s; then exit 75 (rerun once the store is back). 0 = fail at once."
    )


@dataclass
class ModelConfig:
    name_or_path: str = opt(
        "smollm2-135m",
        "Base model: hub id (gpt2), local directory, or a built-in: smollm2-135m, tiny-gpt2.",
    )
    revision: str = opt("", "Hub revision (branch, tag or commit); '' for the default.")


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank.")
    alpha: int = opt(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = opt(
        0.0, "LoRA dropout. 0 as in peft and torchtune: peft then skips a dropout copy of every adapted layer's "
        "input (steps 23% faster on CPU, bench/RESULTS.md); 0.05-0.1 against overfitting many epochs of little data."
    )
    target_modules: list[str] = opt([], "Modules to adapt; empty = architecture default (GPT-2: c_attn, c_proj, c_fc).")
    top_layers: int = opt(
        0, "Adapt only the top N transformer blocks (0 = all). Backward then stops at the lowest adapted block: "
        "fewer FLOPs per token, at some cost in what the adapter can learn."
    )


@dataclass
class TrainConfig:
    max_steps: int = opt(30, "Optimizer steps to train.")
    seed: int = opt(42, "Seed for LoRA init, dropout and data order.")
    save_steps: int = opt(0, "Checkpoint every N steps (0 = only at the end).")
    batch_size: int = opt(4, "Sequences per device per micro-batch.")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    max_length: int = opt(256, "Tokens per packed training sequence.")
    learning_rate: float = opt(5e-4, "Peak learning rate.")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule (any transformers SchedulerType).")
    warmup_steps: int = opt(3, "Linear warm-up steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    loraplus_lr_ratio: float = opt(
        0.0, "LoRA+ (Hayou et al. 2024): the B matrices learn at ratio x learning_rate, A at learning_rate; "
        "0 = plain LoRA (one rate)."
    )
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "auto = bf16 where the hardware has fast bf16 (CUDA, or a CPU with avx512_bf16/AMX), else fp32."
    )
    packing: Literal["wrapped", "documents"] = opt(
        "wrapped", "wrapped: documents joined with eos and cut anywhere; documents: position ids restart per document."
    )
    data_streams: int = opt(
        0, "Data streams (0 = number of processes); fix it to keep the data order when the process count changes."
    )
    keep_checkpoints: int = opt(2, "Complete checkpoints kept in <run.dir>/checkpoints (newest first).")
    deepspeed: str = opt("", "DeepSpeed config JSON (e.g. configs/deepspeed/zero2.json); '' = plain DDP.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward (saves memory, costs ~30% speed).")
    model_dropout: Optional[float] = opt(
        0.0, "Dropout inside the frozen base model while fine-tuning (GPT-2 ships 0.1); null keeps the model's own. "
        "0 as in torchtune and litgpt: attention runs fused and no random mask is drawn (bench/RESULTS.md); "
        "lora.dropout regularises the adapter where wanted."
    )
    logging_steps: int = opt(1, "Log loss, lr and tokens/s every N steps.")
    merge: bool = opt(False, "Also save the merged model (base + adapter) as safetensors in <run.dir>/merged.")
    sft_args: dict[str, Any] = opt({}, "Pass-through for any other trl.SFTConfig field (not those medgen sets itself: "
                                   "validate names them).")


@dataclass
class EvalConfig:
    split: Literal["train", "validation", "test"] = opt("test", "Split to score.")
    batch_size: int = opt(8, "Windows per forward pass (does not change the result).")
    context: int = opt(512, "Window length in tokens (capped at the model's maximum).")
    stride: int = opt(256, "Sliding-window stride (< context): each token keeps at least context-stride tokens of history.")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "Compute dtype for scoring.")
    max_articles: int = opt(0, "Score only the first N articles of the split, in manifest order (0 = all).")
    bootstrap: int = opt(1000, "Bootstrap resamples (over articles) for the 95% intervals.")
    seed: int = opt(0, "Bootstrap seed: the intervals are a function of the articles and this seed alone.")
    top_tags: int = opt(10, "Per-tag perplexity for this many most frequent tags (0 = none).")
    threads: int = opt(0, "CPU threads per process (0 = the cores this process may use / processes on the node).")


@dataclass
class GenerateConfig:
    prompts: str = opt(DEMO_PROMPTS, "Prompts: JSONL with id/prompt, or text with one prompt per line (any fsspec URL); '-' = stdin.")
    max_new_tokens: int = opt(48, "New tokens per completion (at most).")
    min_new_tokens: int = opt(0, "Suppress end-of-text until this many new tokens (0 = off; benchmarks force full length).")
    do_sample: bool = opt(False, "Sample (true) or greedy (false).")
    temperature: float = opt(0.8, "Sampling temperature.")
    top_p: float = opt(0.95, "Nucleus sampling threshold (1.0 = off).")
    top_k: int = opt(50, "Top-k sampling (0 = off).")
    repetition_penalty: float = opt(1.0, "Repetition penalty (1.0 = off).")
    stop: list[str] = opt([], "Stop strings: a completion ends before the first one it contains (finish_reason stop).")
    num_samples: int = opt(1, "Completions per prompt, one line each with its 'sample' index; > 1 needs do_sample.")
    batch_size: int = opt(0, "Prompts per generate() call; 0 = for the device: 64 on a CPU, on a GPU what half its free "
                          "memory holds as KV cache (at most 256). Does not change the output in float32.")
    seed: int = opt(0, "Sampling seed; each (id, sample) has its own random stream, so batching does not matter.")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "Compute dtype; float32 keeps greedy output identical across batch sizes and ranks.")
    merge_tolerance: float = opt(1e-4, "Merge the adapter into the weights if merged logits match unmerged within this (relative); 0 = never.")


def _check_generate(g: GenerateConfig) -> list[str]:
    p: list[str] = []
    if g.prompts != "-" and _is_local(g.prompts) and not os.path.isfile(_local_path(g.prompts)):
        p.append(f"generate.prompts: file not found: {g.prompts}")
    if not 0 <= g.min_new_tokens <= g.max_new_tokens:
        p.append(f"generate.min_new_tokens: must be in [0, generate.max_new_tokens] (got {g.min_new_tokens})")
    if g.num_samples < 1:
        p.append(f"generate.num_samples: must be > 0 (got {g.num_samples})")
    elif g.num_samples > 1 and not g.do_sample:
        p.append("generate.num_samples: > 1 needs generate.do_sample=true (greedy samples would all be equal)")
    if g.do_sample and g.temperature <= 0:
        p.append(f"generate.temperature: must be > 0 when sampling (got {g.temperature})")
    if not 0.0 < g.top_p <= 1.0:
        p.append(f"generate.top_p: must be in (0, 1] (got {g.top_p})")
    if g.top_k < 0:
        p.append(f"generate.top_k: must be >= 0 (got {g.top_k})")
    if g.repetition_penalty <= 0:
        p.append(f"generate.repetition_penalty: must be > 0 (got {g.repetition_penalty})")
    if any(not s for s in g.stop):
        p.append("generate.stop: stop strings must not be empty")
    if g.merge_tolerance < 0:
        p.append(f"generate.merge_tolerance: must be >= 0 (got {g.merge_tolerance})")
    return p


@dataclass
class SlurmConfig:
    profile: str = opt("local", "Cluster profile: a name (a built-in: local, local-gpu, gpu-example; or a YAML file in "
                       "slurm.profile_dir) or a YAML path.")
    profile_dir: str = opt("", "Directory of your own profiles, searched for a bare slurm.profile name before the built-in ones.")
    nodes: int = opt(0, "Nodes for train, evaluate and generate (0 = the profile's).")
    timeout_min: int = opt(0, "Time limit of each stage's job in minutes (0 = the profile's).")
    signal_delay_s: int = opt(
        90, "USR2 this long before the time limit: train checkpoints, the job is requeued (< time limit - 60 s)."
    )
    max_requeues: int = opt(3, "Time limits a stage may hit (each one requeues it) before it fails.")
    folder: str = opt("", "Job scripts, pickles and logs; '' = <run.dir>/slurm (a fresh subfolder per submission).")
    stages: list[str] = opt(list(STAGES), "Stages to submit, in pipeline order; each starts once the previous succeeded.")
    array_parallelism: int = opt(0, "Sweeps: array elements (grid points) running at once per stage, sbatch --array=...%k "
                                 "(0 = the profile's).")


@dataclass
class SweepConfig:
    grid: dict[str, Any] = opt({}, "medgen sweep: dotted key -> list of values; every combination is one run under "
                               "run.dir (e.g. {lora.r: [8, 16], train.learning_rate: [5e-4, 1e-3]}).")


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


# --------------------------------------------------------------------------- loading


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """YAML file (optional) + ``a.b=value`` overrides -> validated Config, or ConfigError with every problem."""
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path:
        raw = _read_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {p} is not a section")
                break
        else:
            node[parts[-1]] = _parse_scalar(value)
    return from_raw(raw, problems)


def from_raw(raw: dict[str, Any], problems: list[str] | None = None) -> Config:
    """A validated Config from a parsed mapping (as a YAML file holds it), or ConfigError with every problem
    (``problems``: those found before, reported with these)."""
    problems = list(problems or [])
    cfg = build_dataclass(Config, raw, "", problems)
    problems += _check(cfg)  # fields that failed to parse kept their (valid) defaults
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: str) -> dict[str, Any]:
    """The file's mapping ({} when empty); bytes go to PyYAML, which reads UTF-8/16 and rejects the rest."""
    try:
        with open(path, "rb") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError([f"--config {path}: file not found"]) from None
    except OSError as e:
        raise ConfigError([f"--config {path}: cannot read it ({e.strerror or type(e).__name__})"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"--config {path}: not valid YAML ({str(e).splitlines()[0]})"]) from None
    except RecursionError:
        raise ConfigError([f"--config {path}: nested too deeply to be a config"]) from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ConfigError([f"--config {path}: not valid YAML ({str(e).splitlines()[0][:100]})"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"--config {path}: top level must be a mapping of sections (got {type(raw).__name__})"])
    return raw


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlong = 2, 4, 4, 40
_SHORT.maxstring = _SHORT.maxother = 80


def _shown(value: Any) -> str:
    """A bounded, one-line repr: a value from YAML may be huge, or aliased a billion times over."""
    return _SHORT.repr(value)[:200]


def _key(key: Any) -> str:
    return key if isinstance(key, str) and key.isprintable() and key else _shown(key)


def _parse_scalar(text: str) -> Any:
    if text.strip() == "-":  # YAML reads a lone dash as [None]; on the command line it means stdin
        return "-"
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        return text


def build_dataclass(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """An instance of the config dataclass ``cls`` from a parsed YAML mapping; each problem is appended to
    ``problems`` (prefixed), and a field that fails keeps its default. The profiles of launch/slurm use it too."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            problems.append(f"{prefix}{_key(key)}: unknown key (known: {', '.join(sorted(names))})")
    obj = cls()
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            setattr(obj, f.name, build_dataclass(hint, raw[f.name], f"{prefix}{f.name}.", problems))
        else:
            value, err = _coerce(raw[f.name], hint)
            if err:
                problems.append(f"{prefix}{f.name}: {err} (got {_shown(raw[f.name])})")
            else:
                setattr(obj, f.name, value)
    return obj


def _coerce(value: Any, hint: Any) -> tuple[Any, Optional[str]]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return (value, None) if value in args else (None, f"must be one of {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        errors = []
        for inner in (a for a in args if a is not type(None)):
            coerced, err = _coerce(value, inner)
            if err is None:
                return coerced, None
            errors.append(err)
        return None, " or ".join(errors[:1] + [e.removeprefix("must be ") for e in errors[1:]])
    if origin is list:
        if not isinstance(value, list):
            return None, "must be a list"
        out = []
        for v in value:
            c, err = _coerce(v, args[0])
            if err:
                return None, f"list item {_shown(v)} {err}"
            out.append(c)
        return out, None
    if origin is dict:
        return (dict(value), None) if isinstance(value, dict) else (None, "must be a mapping")
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return None, "must be an integer"
        return (value, None) if abs(value) < 2**63 else (None, "must fit in 64 bits")
    if hint is float:
        if isinstance(value, bool):
            return None, "must be a number"
        try:  # YAML 1.1 reads 5e-4 as a string
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            return None, "must be a number"
        return (number, None) if math.isfinite(number) else (None, "must be a finite number")
    if hint is str:
        return (value, None) if isinstance(value, str) else (None, "must be a string")
    return value, None


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _check_sources(source: str | list[str]) -> list[str]:
    """Local files and globs are checked now; object-store URLs when prepare opens them."""
    urls = [source] if isinstance(source, str) else source
    if not urls:
        return ["data.source: an empty list; name at least one CSV file"]
    p = []
    for url in urls:
        if not _is_local(url):
            continue
        path = _local_path(url)
        if any(ch in path for ch in "*?["):
            if not any(os.path.isfile(f) for f in glob.glob(path)):
                p.append(f"data.source: no file matches {url}")
        elif not os.path.isfile(path):
            p.append(f"data.source: file not found: {url}")
    return p


def _check(cfg: Config) -> list[str]:
    """Semantic checks that need more than one field or the file system."""
    p: list[str] = []
    d, t, e, g = cfg.data, cfg.train, cfg.eval, cfg.generate
    p += _check_sources(d.source)
    if not d.text_column:
        p.append("data.text_column: must name the CSV column holding the article text")
    for name, frac in (("data.val_fraction", d.val_fraction), ("data.test_fraction", d.test_fraction)):
        if not 0.0 <= frac < 1.0:
            p.append(f"{name}: must be in [0, 1) (got {frac})")
    if not 0.0 <= d.near_dup_threshold <= 1.0:
        p.append(f"data.near_dup_threshold: must be in [0, 1] (got {d.near_dup_threshold})")
    if d.near_dup_num_perm < 2:
        p.append(f"data.near_dup_num_perm: must be >= 2 (got {d.near_dup_num_perm})")
    if d.min_chars > d.max_chars:
        p.append(f"data.min_chars: must be <= data.max_chars ({d.min_chars} > {d.max_chars})")
    if d.val_fraction + d.test_fraction >= 1.0:
        p.append("data.val_fraction + data.test_fraction: must leave some articles for training")
    p += _check_known_names(cfg)
    p += [f"data.storage_options.{k}: credentials do not belong in a config (it is copied into run folders "
          f"and SLURM jobs); set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) "
          f"or use a profile" for k in _credential_keys(d.storage_options)]
    positive = {
        "data.num_shards": d.num_shards, "data.chunk_rows": d.chunk_rows, "train.max_steps": t.max_steps,
        "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.max_length": t.max_length,
        "train.logging_steps": t.logging_steps, "eval.batch_size": e.batch_size, "eval.context": e.context,
        "eval.stride": e.stride, "generate.max_new_tokens": g.max_new_tokens,
        "lora.r": cfg.lora.r, "train.keep_checkpoints": t.keep_checkpoints,
    }
    p += [f"{k}: must be > 0 (got {v})" for k, v in positive.items() if v <= 0]
    non_negative = {"data.retry_seconds": d.retry_seconds, "data.workers": d.workers, "lora.top_layers": cfg.lora.top_layers, "train.save_steps": t.save_steps,
                    "train.data_streams": t.data_streams, "train.loraplus_lr_ratio": t.loraplus_lr_ratio, "eval.max_articles": e.max_articles,
                    "eval.top_tags": e.top_tags, "eval.threads": e.threads,
                    "generate.batch_size": g.batch_size}
    p += [f"{k}: must be >= 0 (got {v})" for k, v in non_negative.items() if v < 0]
    if t.deepspeed and not os.path.isfile(t.deepspeed):
        p.append(f"train.deepspeed: file not found: {t.deepspeed}")
    if e.bootstrap < 2:
        p.append(f"eval.bootstrap: must be >= 2 resamples (got {e.bootstrap})")
    if e.stride >= e.context:
        p.append(f"eval.stride: must be < eval.context ({e.stride} >= {e.context})")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        p.append(f"lora.dropout: must be in [0, 1) (got {cfg.lora.dropout})")
    if cfg.train.model_dropout is not None and not 0.0 <= cfg.train.model_dropout < 1.0:
        p.append(f"train.model_dropout: must be in [0, 1) or null (got {cfg.train.model_dropout})")
    p += _check_generate(g)
    if not cfg.run.dir:
        p.append("run.dir: must not be empty")
    return p + _check_slurm(cfg.slurm)


BUILTIN_LAYERS = {"smollm2-135m": 30, "tiny-gpt2": 2}  # as medgen/models.py builds them (tests/test_models.py)

# SFTConfig fields medgen sets itself: from its own field (the value), or because exact resume and the packed
# stream rely on them ("")
MANAGED_SFT_ARGS = {
    "output_dir": "run.dir", "max_steps": "train.max_steps", "num_train_epochs": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.learning_rate", "lr_scheduler_type": "train.lr_scheduler",
    "warmup_steps": "train.warmup_steps", "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm", "seed": "train.seed", "data_seed": "train.seed",
    "bf16": "train.precision", "fp16": "train.precision", "gradient_checkpointing": "train.gradient_checkpointing",
    "logging_steps": "train.logging_steps", "save_strategy": "train.save_steps", "save_steps": "train.save_steps",
    "save_total_limit": "train.keep_checkpoints", "max_length": "train.max_length", "deepspeed": "train.deepspeed",
    "use_cpu": "", "ignore_data_skip": "", "packing": "", "dataset_kwargs": "", "dataloader_num_workers": "",
    "accelerator_config": "", "resume_from_checkpoint": "",
}


def _check_known_names(cfg: Config) -> list[str]:
    """Names that are only known to the stage that uses them: cleaning rules, languages, SFTConfig fields,
    LoRA layers of a model whose shape can be read without loading it."""
    from medgen.data import clean, filters

    p = clean.check_rules(cfg.data.clean_rules)
    p += filters.check_languages(cfg.data.languages)
    for k in cfg.train.sft_args:
        if k in MANAGED_SFT_ARGS:
            own = MANAGED_SFT_ARGS[k]
            p.append(f"train.sft_args.{k}: medgen sets this itself" + (f"; use {own}" if own else
                     " (exact resume and the packed data stream rely on it)"))
    layers = _model_layers(cfg.model.name_or_path)
    if layers and cfg.lora.top_layers > layers:
        p.append(f"lora.top_layers: {cfg.lora.top_layers} is more than the {layers} layers of {cfg.model.name_or_path}")
    return p


def _model_layers(name: str) -> int:
    """Transformer layers of a built-in or a local model directory (0 = not known without loading it)."""
    path = Path(name) / "config.json"
    if path.is_file():
        try:
            c = json.loads(path.read_text(encoding="utf-8"))
            return int(c.get("n_layer") or c.get("num_hidden_layers") or 0)
        except (OSError, ValueError, TypeError):
            return 0
    return BUILTIN_LAYERS.get(name, 0)


CREDENTIAL_KEYS = {"key", "secret", "token", "password", "access_key", "secret_key", "session_token",
                   "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key",
                   "sas_token", "connection_string", "client_secret", "credentials"}


def _credential_keys(options: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the keys in ``options`` (nested too) that would hold a credential."""
    found = []
    for k, v in options.items():
        if str(k).lower() in CREDENTIAL_KEYS:
            found.append(f"{prefix}{k}")
        elif isinstance(v, dict):
            found += _credential_keys(v, f"{prefix}{k}.")
    return found


def _check_slurm(s: SlurmConfig) -> list[str]:
    """Ranges and stage names; the profile and paths are checked when a chain is built (medgen/launch/slurm.py)."""
    p = [f"slurm.{k}: must be >= 0 (got {v})" for k, v in
         (("nodes", s.nodes), ("timeout_min", s.timeout_min), ("signal_delay_s", s.signal_delay_s),
          ("max_requeues", s.max_requeues), ("array_parallelism", s.array_parallelism)) if v < 0]
    unknown = [x for x in s.stages if x not in STAGES]
    if unknown:
        p.append(f"slurm.stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
    elif not s.stages or s.stages != sorted(set(s.stages), key=STAGES.index):
        p.append(f"slurm.stages: must list stages once each, in pipeline order ({', '.join(STAGES)})")
    return p


# --------------------------------------------------------------------------- documentation


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield (dotted key, type, default, help) for every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from iter_fields(hint, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield f"{prefix}{f.name}", hint, default, f.metadata.get("help", "")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " \\| ".join(map(str, args))  # escaped: a bare | would end the Markdown table cell
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def config_doc() -> str:
    """Markdown reference of every config key (kept in README.md; CI checks it is current)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, hint, default, help_ in iter_fields():
        if isinstance(default, str) and default.startswith(str(ASSETS)):
            default = "<bundled demo " + os.path.basename(default) + ">"
        shown = json.dumps(default) if not isinstance(default, str) else (f"`{default}`" if default else "`''`")
        if not isinstance(default, str):
            shown = f"`{shown}`"
        lines.append(f"| `{key}` | {_type_name(hint)} | {shown} | {help_} |")
    return "\n".join(lines) + "\n"


DOC_START, DOC_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def update_doc(path: str) -> bool:
    """Rewrite the reference between the markers in ``path``; True when it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, _, rest = text.partition(DOC_START)
    _, _, tail = rest.partition(DOC_END)
    new = f"{head}{DOC_START}\n{config_doc()}{DOC_END}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, width=120)
