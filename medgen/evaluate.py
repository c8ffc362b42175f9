"""Stage 3, evaluate: exact perplexity of base and tuned model on a split.

perplexity = exp(sum of token NLL / number of predicted tokens). Both sums are accumulated in float64
per article, per rank, then all-reduced, so the value does not depend on batch size or world size.
Each article is scored as ``[sep] + tokens`` (the separator that precedes every document in training);
articles longer than ``context`` are scored with a sliding window: every token is predicted exactly
once, with at least ``context - stride`` tokens of history.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medgen import models
from medgen.config import Config
from medgen.data import shards, stream
from medgen.errors import UserError

log = logging.getLogger(__name__)
LN2 = math.log(2.0)


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, n_targets) over a sequence of ``n_tokens + 1`` positions (position 0 = separator).

    Targets are the last ``n_targets`` positions of ``[begin, end)``; together they cover 1..n exactly
    once. The first window is a full context; each later one adds ``stride`` targets (stride < context),
    each with at least ``context - stride`` tokens of history.
    """
    length = n_tokens + 1
    prev_end = min(context, length)
    if prev_end > 1:
        yield 0, prev_end, prev_end - 1
    while prev_end < length:
        end = min(prev_end + stride, length)
        yield max(0, end - context), end, end - prev_end
        prev_end = end


@torch.no_grad()
def score(model, articles: list[dict], sep: int, context: int, stride: int, batch_size: int,
          device: torch.device, desc: str = "score") -> list[tuple[float, int]]:
    """Per-article (NLL sum in float64, predicted tokens)."""
    work = []  # (article index, window ids, n_targets)
    for i, a in enumerate(articles):
        seq = [sep] + list(a["input_ids"])
        for begin, end, k in windows(len(a["input_ids"]), context, stride):
            work.append((i, seq[begin:end], k))
    # longest first: batches of similar length waste less padding (order never changes a sum's terms)
    work.sort(key=lambda w: -len(w[1]))
    nll = [0.0] * len(articles)
    count = [0] * len(articles)
    for s in tqdm(range(0, len(work), batch_size), desc=desc, unit=" batch", disable=None, leave=False):
        batch = work[s:s + batch_size]
        width = max(len(w[1]) for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        target_mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for r, (_, seq, k) in enumerate(batch):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
            target_mask[r, len(seq) - k:len(seq)] = True
        ids, mask, target_mask = ids.to(device), mask.to(device), target_mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        # position p predicts token p+1
        pred = logits[:, :-1].float()
        tgt_mask = target_mask[:, 1:]
        token_nll = F.cross_entropy(pred[tgt_mask], ids[:, 1:][tgt_mask], reduction="none").double()
        per_row = torch.zeros(len(batch), dtype=torch.float64, device=device)
        rows = torch.arange(len(batch), device=device).unsqueeze(1).expand_as(tgt_mask)[tgt_mask]
        per_row.index_add_(0, rows, token_nll)
        for r, (i, _, k) in enumerate(batch):
            nll[i] += per_row[r].item()
            count[i] += k
    return list(zip(nll, count))


def _all_reduce(values: list[float], state) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=state.device)
    if state.num_processes > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _gather(obj: Any, state) -> list[Any]:
    if state.num_processes == 1:
        return [obj]
    out: list[Any] = [None] * state.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def bootstrap(nll: np.ndarray, tok: np.ndarray, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Perplexities of ``n`` article-level bootstrap resamples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(nll), size=(n, len(nll)))
    return np.exp(nll[idx].sum(1) / tok[idx].sum(1))


def summarise(nll_sum: float, tokens: int, n_bytes: int, articles: int, boot: np.ndarray | None) -> dict[str, Any]:
    out = {
        "perplexity": math.exp(nll_sum / tokens) if tokens else float("nan"),
        "nll_sum": nll_sum,
        "tokens": int(tokens),
        "articles": int(articles),
        "bytes": int(n_bytes),
        "bits_per_byte": nll_sum / LN2 / n_bytes if n_bytes else float("nan"),
    }
    if boot is not None:
        out["ci95"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    return out


def run(cfg: Config) -> dict[str, Any]:
    from peft import PeftModel

    from accelerate import PartialState

    state = PartialState()
    e = cfg.eval
    run_dir = Path(cfg.run.dir)
    tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    manifest = shards.read_manifest(cfg.shards_url, cfg.data.storage_options)
    shards.check_tokenizer(manifest, models.tokenizer_fingerprint(tok), cfg.model.name_or_path, cfg.shards_url)
    articles = stream.load_articles(cfg.shards_url, manifest, cfg.data.storage_options, e.split)
    if not articles:
        raise UserError(f"eval.split={e.split}: the prepared dataset has no articles in this split")
    dtype = torch.float32 if e.dtype == "float32" else torch.bfloat16
    model = models.load_model(cfg.model.name_or_path, cfg.model.revision, dtype)
    context = min(e.context, getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", e.context))
    stride = min(e.stride, context - 1)
    adapter_dir = run_dir / "adapter"
    has_adapter = (adapter_dir / "adapter_config.json").exists()
    if has_adapter:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.to(state.device).eval()
    mine = articles[state.process_index::state.num_processes]  # disjoint by article, no sampler padding
    sep = tok.eos_token_id
    results: dict[str, list[tuple[float, int]]] = {}
    if has_adapter:
        with model.disable_adapter():
            results["base"] = score(model, mine, sep, context, stride, e.batch_size, state.device, "eval base")
        results["tuned"] = score(model, mine, sep, context, stride, e.batch_size, state.device, "eval tuned")
    else:
        results["base"] = score(model, mine, sep, context, stride, e.batch_size, state.device, "eval base")
    per_rank = [
        {"id": a["id"], "tags": a["tags"], "bytes": a["n_bytes"],
         **{f"{k}_nll": v[j][0] for k, v in results.items()}, "tokens": results["base"][j][1]}
        for j, a in enumerate(mine)
    ]
    totals = {k: _all_reduce([sum(x[0] for x in v), sum(x[1] for x in v)], state) for k, v in results.items()}
    bytes_total, n_articles = _all_reduce([sum(a["n_bytes"] for a in mine), len(mine)], state)
    gathered = _gather(per_rank, state)
    if not state.is_main_process:
        state.wait_for_everyone()
        return {}
    # articles back in manifest order (rank r holds articles r, r+world, ...)
    order = {a["id"]: i for i, a in enumerate(articles)}
    rows = sorted((r for part in gathered for r in part), key=lambda r: order[r["id"]])
    metrics = _metrics(cfg, rows, totals, bytes_total, n_articles, context, stride, has_adapter, adapter_dir,
                       state.num_processes)
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "articles.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    state.wait_for_everyone()
    return metrics


def _metrics(cfg, rows, totals, bytes_total, n_articles, context, stride, has_adapter, adapter_dir, world):
    tok = np.array([r["tokens"] for r in rows], dtype=np.float64)
    out: dict[str, Any] = {
        "split": cfg.eval.split, "method": "sliding_window", "context": context, "stride": stride,
        "model": cfg.model.name_or_path, "model_fingerprint": models.model_fingerprint(cfg.model.name_or_path),
        "adapter_fingerprint": models.files_fingerprint(str(adapter_dir), ("*.safetensors", "adapter_config.json")) if has_adapter else "",
        "world_size": world,
    }
    boots = {}
    for k, (nll_sum, tokens) in totals.items():
        nll = np.array([r[f"{k}_nll"] for r in rows], dtype=np.float64)
        boots[k] = bootstrap(nll, tok)
        out[k] = summarise(nll_sum, int(round(tokens)), int(round(bytes_total)), int(round(n_articles)), boots[k])
        out[k]["per_tag"] = _per_tag(rows, k)
    if "tuned" in out:
        diff = boots["tuned"] - boots["base"]  # paired: same resampled articles
        out["delta"] = {
            "perplexity": out["tuned"]["perplexity"] - out["base"]["perplexity"],
            "ratio": out["tuned"]["perplexity"] / out["base"]["perplexity"],
            "ci95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
        }
    return out


def _per_tag(rows: list[dict], key: str, top: int = 10) -> dict[str, dict[str, float]]:
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for r in rows:
        for tag in r["tags"]:
            a = acc[tag]
            a[0] += r[f"{key}_nll"]
            a[1] += r["tokens"]
            a[2] += 1
    best = sorted(acc.items(), key=lambda kv: (-kv[1][2], kv[0]))[:top]
    return {t: {"perplexity": math.exp(v[0] / v[1]), "articles": v[2], "tokens": v[1]} for t, v in best}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
