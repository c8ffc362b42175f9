"""Stage 4, generate: batched completions for a prompts file -> JSONL with provenance on every line.

Each rank takes a disjoint part of the prompts and appends finished records to its own part file
(flushed per batch; a rerun skips ids already there). Rank 0 then merges the parts, in input order,
into ``generations/generations.jsonl`` (temp name, then rename).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import fsspec
import torch
from tqdm.auto import tqdm

from medgen import models
from medgen.config import Config, GenerateConfig
from medgen.data.read import redact
from medgen.errors import UserError

log = logging.getLogger(__name__)


def read_prompts(url: str, storage_options: dict | None = None) -> list[dict[str, Any]]:
    """JSONL objects with ``id`` and ``prompt`` (other fields carried through), or one prompt per text line."""
    try:
        with fsspec.open(url, "r", encoding="utf-8", **(storage_options or {})) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"generate.prompts: not found: {redact(url)}") from None
    jsonl = url.endswith((".jsonl", ".json"))
    prompts, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"generate.prompts {redact(url)}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise UserError(f"generate.prompts {redact(url)}:{n}: needs a string field 'prompt'")
            rec["id"] = str(rec.get("id", f"line-{n}"))
        else:
            rec = {"id": f"line-{n}", "prompt": line}
        if rec["id"] in seen:
            raise UserError(f"generate.prompts {redact(url)}:{n}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        prompts.append(rec)
    return prompts


def gen_params(g: GenerateConfig) -> dict[str, Any]:
    p: dict[str, Any] = {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample,
                         "repetition_penalty": g.repetition_penalty}
    if g.do_sample:
        p.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    return p


class Generator:
    """A loaded model (adapter merged) that completes batches of prompts."""

    def __init__(self, cfg: Config, device: torch.device, adapter: bool = True):
        from peft import PeftModel

        self.cfg = cfg
        self.device = device
        self.tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision, padding_side="left")
        model = models.load_model(cfg.model.name_or_path, cfg.model.revision, torch.float32)
        adapter_dir = Path(cfg.run.dir) / "adapter"
        self.adapter_fingerprint = ""
        if adapter and (adapter_dir / "adapter_config.json").exists():
            # merged for speed: in fp32 the merged model matches the adapter model to ~1e-7 (tests check it)
            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            self.adapter_fingerprint = models.files_fingerprint(str(adapter_dir), ("*.safetensors", "adapter_config.json"))
        self.model = model.to(device).eval()
        self.model.generation_config.pad_token_id = self.tok.pad_token_id
        self.model_fingerprint = models.model_fingerprint(cfg.model.name_or_path)

    @torch.no_grad()
    def complete(self, batch: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
        g = self.cfg.generate
        enc = self.tok([r["prompt"] for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        torch.manual_seed(seed)
        out = self.model.generate(**enc, **gen_params(g), eos_token_id=self.tok.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        records = []
        for rec, ids, mask in zip(batch, new, enc["attention_mask"].tolist()):
            eos = self.tok.eos_token_id
            finish = "length"
            if eos in ids:
                ids = ids[:ids.index(eos)]
                finish = "eos"
            records.append({
                **rec,
                "completion": self.tok.decode(ids, skip_special_tokens=True),
                "model": self.cfg.model.name_or_path,
                "model_fingerprint": self.model_fingerprint,
                "adapter_fingerprint": self.adapter_fingerprint,
                "params": gen_params(g),
                "seed": seed,
                "prompt_tokens": int(sum(mask)),
                "completion_tokens": len(ids),
                "finish_reason": finish,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
        return records


def _done_ids(path: Path) -> set[str]:
    """Ids already finished in a part file; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return set()
    done, good = set(), 0
    with open(path, "rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            break
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def _batches(items: list[dict], size: int) -> Iterator[list[dict]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run(cfg: Config) -> dict[str, Any]:
    from accelerate import PartialState

    state = PartialState()
    g = cfg.generate
    prompts = read_prompts(g.prompts, cfg.data.storage_options)
    out_dir = Path(cfg.run.dir) / "generations"
    out_dir.mkdir(parents=True, exist_ok=True)
    part = out_dir / f"part-{state.process_index:05d}-of-{state.num_processes:05d}.jsonl"
    mine = prompts[state.process_index::state.num_processes]
    done = _done_ids(part)
    todo = [p for p in mine if p["id"] not in done]
    if todo:
        gen = Generator(cfg, state.device)
        # sort by prompt length so each batch pads little; output order is restored at merge
        todo.sort(key=lambda p: len(gen.tok(p["prompt"], add_special_tokens=False)["input_ids"]))
        with open(part, "a", encoding="utf-8") as f:
            for batch in tqdm(list(_batches(todo, g.batch_size)), desc="generate", unit=" batch", disable=None):
                for rec in gen.complete(batch, g.seed):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
    state.wait_for_everyone()
    if state.is_main_process:
        _merge(out_dir, prompts, state.num_processes)
    state.wait_for_everyone()
    return {"prompts": len(prompts), "path": str(out_dir / "generations.jsonl")}


def _merge(out_dir: Path, prompts: list[dict], world: int) -> None:
    by_id: dict[str, str] = {}
    for p in sorted(out_dir.glob("part-*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                by_id.setdefault(json.loads(line)["id"], line)
    missing = [p["id"] for p in prompts if p["id"] not in by_id]
    if missing:
        raise RuntimeError(f"generate: {len(missing)} prompts have no completion (first: {missing[0]})")
    final = out_dir / "generations.jsonl"
    tmp = out_dir / "generations.jsonl.tmp"
    tmp.write_text("".join(by_id[p["id"]] + "\n" for p in prompts), encoding="utf-8")
    os.replace(tmp, final)


def one(cfg: Config, prompt: str) -> str:
    """Complete a single prompt (``medgen generate --prompt``)."""
    gen = Generator(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return gen.complete([{"id": "prompt", "prompt": prompt}], cfg.generate.seed)[0]["completion"]
