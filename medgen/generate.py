"""Stage 4, generate: batched completions -> JSONL with provenance on every line, each (id, sample) exactly once.

Why the output does not depend on batching or on the number of processes (docs/generate.md has the long form):

- prompts are left-padded with an attention mask; transformers derives position ids from the mask and
  masks padding out of the repetition penalty, so a padded row computes what it computes alone (fp32);
- sampling draws from one random stream per (seed, id, sample) (``RowSampler``), never from a stream
  shared by the batch.

Exactly once: each rank appends finished records to its own part file (one write + fsync per batch) and
skips every (id, sample) found in ANY part file, whatever world size wrote it; a torn last line is cut
before appending. Rank 0 then copies the part lines, in input order, into ``generations.jsonl``
(temp name, fsync, rename).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from medgen import atomic, memory, models, openai_batch, provenance, watchdog
from medgen.config import ASSETS, Config, GenerateConfig
from medgen.data.prompts import STDIN, looks_jsonl, parse_prompts, read_prompts
from medgen.data.storage import disk_errors
from medgen.dist import barrier, init_distributed
from medgen.errors import UserError
from medgen.logs import Progress

log = logging.getLogger(__name__)

SCHEMA = ASSETS / "generation.schema.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Key = tuple[str, int]

# An item's own decoding settings and seed (an OpenAI batch line's); a medgen record's fields of these names are
# dropped, as the line header would replace them in the output anyway.
OWN_SETTINGS = ("params", "seed")


def expand(prompts: list[dict[str, Any]], num_samples: int) -> list[dict[str, Any]]:
    """One work item per (prompt, sample), in output order."""
    return [{**{k: v for k, v in p.items() if k not in OWN_SETTINGS}, "sample": s}
            for p in prompts for s in range(num_samples)]


def key(rec: dict[str, Any]) -> Key:
    return rec["id"], rec.get("sample", 0)


# --------------------------------------------------------------------------- decoding


def gen_params(g: GenerateConfig) -> dict[str, Any]:
    """The settings that decide a completion (batch size does not: see the module docstring)."""
    p: dict[str, Any] = {"max_new_tokens": g.max_new_tokens, "min_new_tokens": g.min_new_tokens,
                         "do_sample": g.do_sample, "repetition_penalty": g.repetition_penalty,
                         "stop": list(g.stop), "num_samples": g.num_samples, "dtype": g.dtype}
    if g.do_sample:
        p.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    return p


def row_seed(seed: int, id_: str, sample: int) -> int:
    """Seed of one (id, sample)'s own random stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{id_}\0{sample}".encode()).digest()[:8], "big")


class RowSampler(LogitsProcessor):
    """Sampling with one random stream per row, so a row's tokens do not depend on its batch mates.

    HF's sampling draws every row from one global generator: a prompt's sample would change with its
    batch and rank. Here each row draws one uniform per step from its own stream and picks its token by
    inverse CDF; the returned scores keep only that token, so HF's greedy step (do_sample=False) takes it.
    Order as in HF: temperature, then top-k, then top-p (the smallest set of most likely tokens whose
    probability reaches top_p), applied to the top-k candidates only (no sort of the whole vocabulary).
    """

    def __init__(self, g: GenerateConfig, seeds: list[int]):
        self.temperature, self.top_k, self.top_p = g.temperature, g.top_k, g.top_p
        self.rngs = [random.Random(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.double() / self.temperature  # float64: CDFs over 50k tokens without drift
        idx = None
        if self.top_k > 0:
            logits, idx = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)  # sorted, most likely first
        elif self.top_p < 1.0:
            logits, idx = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:  # drop a token once the more likely ones already reach top_p
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        u = torch.tensor([[r.random()] for r in self.rngs], dtype=torch.float64, device=scores.device)
        # right=True: a token of probability 0 (a flat step of the CDF) is never drawn
        pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
        zero = probs.gather(1, pick) == 0  # only by rounding at the very top end
        pick = torch.where(zero, probs.argmax(-1, keepdim=True), pick)
        tok = idx.gather(1, pick) if idx is not None else pick
        return torch.full_like(scores, float("-inf")).scatter_(1, tok, 0.0)


class StopStrings(StoppingCriteria):
    """Ends a row once its new text contains a stop string (the prompt is not searched)."""

    def __init__(self, tok, stops: list[str], prompt_width: int):
        self.tok, self.stops, self.width = tok, stops, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([_first_stop(t, self.stops) >= 0 for t in texts], device=input_ids.device)


def _first_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in text, -1 if none."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def line_header(cfg: Config, adapter: bool = True) -> dict[str, Any]:
    """The fields every line shares; computable without loading the model (the rerun check needs it). ``judge``:
    the model that scored the first generate.judge_prompts prompts' completions ('' = none)."""
    adapter_dir = cfg.layout.adapter
    has_adapter = adapter and cfg.layout.finished("train") and not cfg.model.base_only
    return {
        "model": cfg.model.name_or_path,
        "model_fingerprint": models.model_fingerprint(cfg.model.name_or_path),
        "adapter_fingerprint": models.adapter_fingerprint(adapter_dir) if has_adapter else "",
        "params": gen_params(cfg.generate),
        "seed": cfg.generate.seed,
        "judge": (cfg.generate.judge or cfg.model.name_or_path) if cfg.generate.judge_prompts else "",
    }


class Generator:
    """A loaded model (adapter merged when exact enough) that completes batches of work items."""

    def __init__(self, cfg: Config, device: torch.device, header: dict[str, Any] | None = None, adapter: bool = True):
        self.g = g = cfg.generate
        self.device = device
        self.header = header or {**line_header(cfg, adapter), "judge": ""}  # direct modes score nothing
        self.tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision, padding_side="left")
        model = models.load_model(cfg.model.name_or_path, cfg.model.revision, torch.float32)
        self.adapter_merged, self.merge_diff = False, float("nan")
        if self.header["adapter_fingerprint"]:
            model, self.adapter_merged, self.merge_diff = models.attach_adapter(
                model, cfg.layout.adapter, self.tok, g.merge_tolerance, "generate.merge_tolerance")
            log.info("adapter %s (merged: %s, relative logit difference %.1e)",
                     self.header["adapter_fingerprint"], self.adapter_merged, self.merge_diff)
        elif adapter:
            log.info("generating with the base model alone (model.base_only=true)")
        self.model = model.to(device=device, dtype=DTYPES[g.dtype]).eval()
        self.max_positions = _max_positions(self.model.config)

    def settings(self, it: dict[str, Any]) -> GenerateConfig:
        """The decoding settings of an item: its own (an OpenAI batch line's) over generate.*."""
        return dataclasses.replace(self.g, **it["params"]) if "params" in it else self.g

    def gen_config(self, g: GenerateConfig) -> GenerationConfig:
        # A fresh config: the model's generation_config.json (sampling defaults etc.) must not leak in.
        return GenerationConfig(
            max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens or None, do_sample=False, num_beams=1,
            repetition_penalty=g.repetition_penalty, eos_token_id=self.tok.eos_token_id,
            pad_token_id=self.tok.pad_token_id, use_cache=True,
        )

    def encode(self, items: list[dict[str, Any]]) -> list[list[int]]:
        """Token ids of each item's prompt; a prompt that cannot fit is a user error, found before any work."""
        ids = self.tok([it["prompt"] for it in items], add_special_tokens=False)["input_ids"]
        for it, x in zip(items, ids):
            new = self.settings(it).max_new_tokens
            if not x:
                raise UserError(f"generate: prompt {it['id']!r} is empty after tokenization")
            if self.max_positions and len(x) + new > self.max_positions:
                raise UserError(f"generate: prompt {it['id']!r} has {len(x)} tokens; with generate.max_new_tokens="
                                f"{new} that exceeds the model's {self.max_positions} positions")
        return ids

    @torch.no_grad()
    def complete(self, items: list[dict[str, Any]], ids: list[list[int]], g: GenerateConfig | None = None
                 ) -> list[dict[str, Any]]:
        """Records for one batch (left-padded to its longest prompt), all decoded with the settings ``g``."""
        g = g or self.g
        width, pad = max(map(len, ids)), self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        seeds = [row_seed(it.get("seed", g.seed), *key(it)) for it in items]
        procs = [RowSampler(g, seeds)] if g.do_sample else []
        stops = [StopStrings(self.tok, g.stop, width)] if g.stop else []
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=self.gen_config(g),
                                  logits_processor=procs, stopping_criteria=stops)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        records = []
        for it, x, new in zip(items, ids, out[:, width:].tolist()):
            text, n, reason = self._finish(new, g.stop)
            own = {k: it[k] for k in OWN_SETTINGS if k in it}  # a line's own settings, not generate.*'s
            records.append({**it, "completion": text, "finish_reason": reason, "prompt_tokens": len(x),
                            "completion_tokens": n, **self.header, **own, "created": created})
        return records

    def _finish(self, new: list[int], stop: list[str]) -> tuple[str, int, str]:
        """(completion, tokens generated for it, finish reason) from a row's new ids."""
        eos, reason = self.tok.eos_token_id, "length"
        if eos in new:  # everything after a row's eos is padding
            new, reason = new[:new.index(eos)], "eos"
        text = self.tok.decode(new, skip_special_tokens=True)
        if stop and _first_stop(text, stop) >= 0:
            for k in range(1, len(new) + 1):  # the token that completed the stop string ends the completion
                text = self.tok.decode(new[:k], skip_special_tokens=True)
                cut = _first_stop(text, stop)
                if cut >= 0:
                    return text[:cut], k, "stop"
        return text, len(new), reason

    def run(self, items: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        """Records batch by batch. Items with the same settings share batches (OpenAI batch lines may each have
        their own); within those, longest prompts first (less padding per batch; memory errors come early)."""
        ids = self.encode(items)
        configs = [self.settings(it) for it in items]
        # one group per distinct decoding (num_samples only says how many items there are; seeds are per row)
        group = [json.dumps({**gen_params(c), "num_samples": 1}, sort_keys=True) for c in configs]
        order = sorted(range(len(items)), key=lambda i: (group[i], -len(ids[i]), i))
        size = self.g.batch_size or auto_batch_size(self.model, self.device, max(map(len, ids), default=0),
                                                    max((c.max_new_tokens for c in configs), default=0))
        if size != getattr(self, "told_batch", None):  # once, not after every prompt of an interactive session
            log.info("generate: %d prompts per batch%s", size, "" if self.g.batch_size else " (generate.batch_size=0: auto)")
            self.told_batch = size
        done, start = 0, 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start < size and group[order[end]] == group[order[start]]:
                end += 1
            chunk = order[start:end]
            try:
                batch = self.complete([items[i] for i in chunk], [ids[i] for i in chunk], configs[chunk[0]])
            except Exception as err:
                if not memory.is_out_of_memory(err):
                    raise
                if len(chunk) == 1:
                    raise UserError(memory.generation_out_of_memory(
                        self.device, len(ids[chunk[0]]), configs[chunk[0]].max_new_tokens)) from None
                batch = None  # the failed batch's tensors go with the exception, before the retry
            if batch is None:
                size = len(chunk) // 2  # and again, until a batch fits: a completion does not depend on its batch
                log.warning("generate: out of memory on %s with %d prompts per batch: %d from here on (set "
                            "generate.batch_size=%d to start there)", self.device, len(chunk), size, size)
                self.told_batch = size
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            done += len(chunk)
            watchdog.progress("generate", done)
            yield batch
            start = end


# bench/bench_generate.py on 2 CPU cores: batch 16 gave 6.8x the per-prompt pipeline, 64 gave 10.7-12x
CPU_BATCH = 64
GPU_MAX_BATCH = 256


def auto_batch_size(model, device: torch.device, longest: int, new_tokens: int) -> int:
    """Prompts per generate() call when generate.batch_size = 0: 64 on a CPU; on a GPU as many as half of its
    free memory holds as KV cache for the longest prompt plus its new tokens, at most 256."""
    if device.type != "cuda":
        return CPU_BATCH
    c = model.config
    layers = getattr(c, "n_layer", None) or c.num_hidden_layers
    hidden = getattr(c, "n_embd", None) or c.hidden_size
    heads = getattr(c, "n_head", None) or c.num_attention_heads
    kv_dim = (getattr(c, "num_key_value_heads", None) or heads) * (hidden // heads)
    per_prompt = 2 * layers * kv_dim * next(model.parameters()).element_size() * (longest + new_tokens)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(GPU_MAX_BATCH, int(free * 0.5 // per_prompt)))


def _max_positions(config) -> int:
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0) or 0)


# --------------------------------------------------------------------------- the job: exactly once


@dataclass(frozen=True)
class OutputSet:
    """One set of completions written exactly once: its part files (``<prefix>part-R-of-W.jsonl``), the settings
    it was made with (``<prefix>job.json``) and the merged file, published last."""

    prefix: str  # '' = the run's completions; 'base-' = the base model's, for the report
    header: dict[str, Any]  # the provenance fields on every line
    final: Path
    adapter: bool
    batch: tuple[openai_batch.Request, ...] = ()  # with batch_output: its OpenAI batch output lines, written first
    batch_output: Path | None = None


def run(cfg: Config) -> dict[str, Any]:
    """The base model's completions of the first generate.base_prompts prompts (when there is an adapter), then
    the run's own; generations.jsonl, published last, marks the stage finished."""
    g = cfg.generate
    if g.prompts == STDIN:
        raise UserError("generate.prompts=- (stdin) works with `medgen generate` only")
    state = init_distributed(timeout=watchdog.pg_timeout(cfg.run))
    prompts = read_prompts(g.prompts, cfg.data.storage_options, cfg.data.retry_seconds)
    requests = prompts if prompts and isinstance(prompts[0], openai_batch.Request) else []
    items = batch_items(cfg, requests, g.prompts) if requests else expand(prompts, g.num_samples)
    ids = list(dict.fromkeys(it["id"] for it in items))  # the prompts (a batch file's valid lines) in input order
    layout = cfg.layout
    layout.generations.mkdir(parents=True, exist_ok=True)
    judge = LazyJudge(cfg, state.device, set(ids[:g.judge_prompts]))
    batch = {"batch": tuple(requests), "batch_output": layout.batch_output_file} if g.format == "openai-batch" else {}
    tuned = OutputSet("", line_header(cfg), layout.generations_file, adapter=True, **batch)
    if tuned.header["adapter_fingerprint"] and g.base_prompts:
        base = OutputSet("base-", line_header(cfg, adapter=False), layout.base_generations_file, adapter=False)
        first = set(ids[:g.base_prompts])
        _complete_once(cfg, state, [it for it in items if it["id"] in first], base, "generate (base model)",
                       judge=judge)
    _complete_once(cfg, state, items, tuned, "generate", record=True, judge=judge)
    out = {"prompts": len(requests or prompts), "lines": len(items), "path": str(layout.generations_file)}
    if batch:
        out.update(batch_output=str(layout.batch_output_file), errors=sum(bool(r.error) for r in requests))
    return out


def batch_items(cfg: Config, requests: list[openai_batch.Request], source: str) -> list[dict[str, Any]]:
    """The work items of an OpenAI batch file's valid lines (one per custom_id and sample, each with its own
    settings). With medgen's own output format, which has no error lines, an invalid line is a user error."""
    tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    from transformers import AutoConfig

    positions = _max_positions(AutoConfig.from_pretrained(models.resolve(cfg.model.name_or_path),
                                                          revision=cfg.model.revision or None, trust_remote_code=False))
    openai_batch.resolve(requests, cfg.generate, tok, positions)
    if cfg.generate.format != "openai-batch" and (err := openai_batch.first_error(requests, source)):
        raise UserError(err)
    return openai_batch.items(requests, gen_params)


class LazyJudge:
    """The judge model, loaded the first time a batch holds a completion to score (medgen/judge.py)."""

    def __init__(self, cfg: Config, device: torch.device, ids: set[str]):
        self.cfg, self.device, self.ids, self.judge = cfg, device, ids, None

    def add_scores(self, records: list[dict[str, Any]]) -> None:
        todo = [r for r in records if r["id"] in self.ids]
        if not todo:
            return
        if self.judge is None:
            from medgen.judge import Judge

            g = self.cfg.generate
            self.judge = Judge.load(g.judge or self.cfg.model.name_or_path, "" if g.judge else self.cfg.model.revision,
                                    self.device)
        for r, s in zip(todo, self.judge.score([(r["prompt"], r["completion"]) for r in todo])):
            r.update(s or {"fluency_perplexity": None, "relevance": None})


def _complete_once(cfg: Config, state, items: list[dict[str, Any]], out: OutputSet, desc: str,
                   record: bool = False, judge: LazyJudge | None = None) -> None:
    """Every item of ``items`` completed once into ``out``, whatever ran before and on however many ranks."""
    out_dir = out.final.parent
    _check_job(out_dir, out, state.is_main_process)
    part = out_dir / f"{out.prefix}part-{state.process_index:05d}-of-{state.num_processes:05d}.jsonl"
    _repair(part)  # only this rank appends to it: cut a torn last line before adding to it
    done = _read_done(out_dir, out.prefix)
    _check_prompts(items, done)
    # Split by position in the full list, not in the to-do list: ranks read the parts at different
    # moments, so their to-do lists may differ, but this split cannot.
    mine = [it for i, it in enumerate(items) if i % state.num_processes == state.process_index and key(it) not in done]
    log.info("%s: %d of %d items to do on rank %d (%d done before)", desc, len(mine), len(items),
             state.process_index, len(done))
    if mine:
        gen = Generator(cfg, state.device, out.header, adapter=out.adapter)
        kept = "the completions written so far are kept; a rerun continues after them"
        with disk_errors(part, "completions", kept):
            fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                with Progress(desc, len(mine), "completions", cfg.run.progress_every, rate="tokens") as progress:
                    for records in gen.run(mine):
                        if judge:
                            judge.add_scores(records)
                        _append(fd, records)
                        progress.update(len(records), tokens=sum(r["completion_tokens"] for r in records))
            finally:
                os.close(fd)
    state.wait_for_everyone()
    if state.is_main_process:
        if record:
            provenance.write(cfg, "generate", world_size=state.num_processes,
                             model_fingerprint=out.header["model_fingerprint"],
                             adapter_fingerprint=out.header["adapter_fingerprint"])
        if out.batch_output:  # before the final file: that one, published last, marks the stage finished
            with disk_errors(out.batch_output, out.batch_output.name, "the part files are kept; a rerun merges them"):
                done = _read_done(out_dir, out.prefix)
                atomic.write_text(out.batch_output, openai_batch.output_text(list(out.batch), done, out.header))
        with disk_errors(out.final, out.final.name, "the part files are kept; a rerun merges them"):
            _merge(out_dir, out.prefix, items, out.final)
    state.wait_for_everyone()


def _append(fd: int, records: list[dict[str, Any]]) -> None:
    """One write and an fsync per batch: a kill leaves whole lines plus at most one torn line; a failed
    write (a full disk) is cut back to the last whole line."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    start = os.lseek(fd, 0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):  # best effort: _repair cuts a torn line on the next start anyway
            os.ftruncate(fd, start)
        raise


def _parse_part(data: bytes) -> tuple[list[tuple[Key, str]], int]:
    """(key, line) of every whole, valid line, and the byte length they cover; reading stops at a bad line."""
    lines, pos = [], 0
    while (nl := data.find(b"\n", pos)) >= 0:
        try:
            text = data[pos:nl].decode("utf-8")
            rec = json.loads(text)
            lines.append((key(rec), text))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            break
        pos = nl + 1
    return lines, pos


def _repair(part: Path) -> None:
    if not part.exists():
        return
    data = part.read_bytes()
    _, good = _parse_part(data)
    if good < len(data):
        log.warning("%s: cutting %d bytes of a torn last line (killed mid-write)", part.name, len(data) - good)
        with open(part, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())


def _read_done(out_dir: Path, prefix: str = "") -> dict[Key, str]:
    """Every finished line in every part file of the set, whichever world size wrote it (first copy wins)."""
    done: dict[Key, str] = {}
    for p in sorted(out_dir.glob(f"{prefix}part-*.jsonl")):
        for k, line in _parse_part(p.read_bytes())[0]:
            done.setdefault(k, line)
    return done


def _check_prompts(items: list[dict[str, Any]], done: dict[Key, str]) -> None:
    """An id whose prompt (or, for an OpenAI batch line, its own settings) changed since its line was written."""
    for it in items:
        line = done.get(key(it))
        if line is None:
            continue
        rec = json.loads(line)
        changed = [k for k in ("prompt", *OWN_SETTINGS) if k in it and rec.get(k) != it[k]]
        if changed:
            what = "prompt" if "prompt" in changed else f"the settings ({', '.join(changed)}) of"
            raise UserError(f"generate: {what} {it['id']!r} changed since its completion was written; give it a "
                            "new id, or use another run.dir")


def _check_job(out_dir: Path, out: OutputSet, main: bool) -> None:
    """Refuse to mix completions of different models or settings in one file; record this job's settings.
    Completions of an adapter the run no longer has (training went on, or ran again) are set aside, and made
    again with the run's adapter: a pipeline rerun after training brings its outputs up to date."""
    path, want = out_dir / f"{out.prefix}job.json", out.header
    if path.exists() and list(out_dir.glob(f"{out.prefix}part-*.jsonl")):
        have = json.loads(path.read_text(encoding="utf-8"))
        diff = [f"params.{k}" for k in sorted(set(want["params"]) | set(have.get("params", {})))
                if want["params"].get(k) != have.get("params", {}).get(k)]
        diff += [k for k in want if k != "params" and have.get(k) != want[k]]
        if diff == ["adapter_fingerprint"] and have.get("adapter_fingerprint") and want["adapter_fingerprint"]:
            barrier()  # every rank has read the files before they move
            if main:
                _set_aside(out_dir, out, have["adapter_fingerprint"], want["adapter_fingerprint"])
            barrier()
        elif diff:
            raise UserError(f"{out_dir} holds completions made with other settings ({', '.join(diff)}); "
                            "use another run.dir, or delete that folder to start over")
        else:
            return
    atomic.write_text(path, json.dumps(want, indent=2) + "\n")  # ranks may race here, harmlessly


def _set_aside(out_dir: Path, out: OutputSet, old: str, new: str) -> None:
    """Move the completions of adapter ``old`` (parts, settings, merged files) into their own folder."""
    folder = out_dir / f"{out.prefix}superseded-{old.removeprefix('sha256:')[:16]}"
    files = [*out_dir.glob(f"{out.prefix}part-*.jsonl"), out_dir / f"{out.prefix}job.json", out.final,
             *([out.batch_output] if out.batch_output else [])]
    folder.mkdir(exist_ok=True)
    for f in files:
        if f.exists():
            os.replace(f, folder / f.name)
    log.warning("generate: %s held completions of adapter %s; the run's adapter is now %s (trained again or "
                "further): they are in %s, generating again", out_dir, old, new, folder)


def _merge(out_dir: Path, prefix: str, items: list[dict[str, Any]], final: Path) -> None:
    """Copy each item's line, verbatim and in input order, into ``final`` (atomically)."""
    done = _read_done(out_dir, prefix)
    missing = [key(it) for it in items if key(it) not in done]
    if missing:
        raise RuntimeError(f"generate: {len(missing)} items have no completion (first: {missing[0]})")
    atomic.write_text(final, "".join(done[key(it)] + "\n" for it in items))


# --------------------------------------------------------------------------- prompts from the command line


def _single_process_device() -> torch.device:
    state = init_distributed()
    if state.num_processes > 1:
        raise UserError("--prompt and stdin prompts run in one process: start medgen without torchrun")
    return state.device


def one(cfg: Config, prompt: str) -> list[str]:
    """Completions (num_samples of them) of a single prompt (``medgen generate --prompt TEXT``)."""
    if not prompt:
        raise UserError("--prompt: empty prompt")
    gen = Generator(cfg, _single_process_device())
    items = expand([{"id": "prompt", "prompt": prompt}], cfg.generate.num_samples)
    return [r["completion"] for batch in gen.run(items) for r in batch]


def from_stdin(cfg: Config, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """Prompts on stdin: a conversation on a terminal, else every line's record as JSONL on stdout."""
    if stdin.isatty():
        return _interactive(cfg, stdin, stdout, stderr)
    text = stdin.read()
    prompts = parse_prompts(text, "<stdin>", looks_jsonl(text))
    requests = prompts if prompts and isinstance(prompts[0], openai_batch.Request) else []
    items = batch_items(cfg, requests, "<stdin>") if requests else expand(prompts, cfg.generate.num_samples)
    gen = Generator(cfg, _single_process_device()) if items else None
    by_key = {key(r): r for batch in (gen.run(items) if gen else []) for r in batch}
    if requests and cfg.generate.format == "openai-batch":
        done = {k: json.dumps(r, ensure_ascii=False) for k, r in by_key.items()}
        stdout.write(openai_batch.output_text(requests, done, gen.header if gen else line_header(cfg)))
    else:
        for it in items:
            stdout.write(json.dumps(by_key[key(it)], ensure_ascii=False) + "\n")
    stdout.flush()
    return len(items)


def _interactive(cfg: Config, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    gen = Generator(cfg, _single_process_device())
    # prompts and hints go to stderr (as Python's own REPL does): stdout holds only completions
    stderr.write("medgen: type a prompt and press Enter; an empty line or Ctrl-D ends\n")
    n = 0
    while True:
        stderr.write("> ")
        stderr.flush()
        line = stdin.readline()
        if not line.strip():
            return n
        n += 1
        items = expand([{"id": f"line-{n}", "prompt": line.rstrip("\r\n")}], cfg.generate.num_samples)
        for batch in gen.run(items):
            for r in batch:
                tag = f"[{r['sample']}] " if cfg.generate.num_samples > 1 else ""
                stdout.write(f"{tag}{r['completion']}\n")
        stdout.flush()
