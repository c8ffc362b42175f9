"""Stage 3, evaluate: exact perplexity of base and tuned model on a split.

perplexity = exp(sum of token NLL / number of predicted tokens). Both sums are accumulated in float64
per article, per rank, then all-reduced, so the value does not depend on batch size or world size.
Each article is scored as ``[sep] + tokens`` (the separator that precedes every document in training);
articles longer than ``context`` are scored with a sliding window: every token is predicted exactly
once, with at least ``context - stride`` tokens of history. docs/evaluate.md has the details and the
schema of ``eval/metrics.json``.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from medgen import atomic, memory, models, watchdog
from medgen import provenance as run_records
from medgen.config import Config
from medgen.data import shards, stream
from medgen.data.storage import disk_errors
from medgen.dist import init_distributed
from medgen.errors import UserError
from medgen.logs import DEFAULT_EVERY, Progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

log = logging.getLogger(__name__)
LN2 = math.log(2.0)
METHOD = "sliding_window"


# --------------------------------------------------------------------------- windows and scoring


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


class Window(NamedTuple):
    article: int  # index into the articles being scored
    ids: list[int]  # the window's tokens
    targets: int  # its last `targets` tokens are predicted


def plan(articles: list[dict], sep: int, context: int, stride: int) -> list[Window]:
    """Every window of every article, longest first.

    Sorted so that a batch holds windows of similar length (little padding); the order never changes
    a result: each window is scored on its own, and per-article sums are exactly rounded (fsum).
    """
    work = []
    for i, a in enumerate(articles):
        seq = [sep] + list(a["input_ids"])
        for begin, end, k in windows(len(seq) - 1, context, stride):
            work.append(Window(i, seq[begin:end], k))
    work.sort(key=lambda w: -len(w.ids))  # stable: ties keep article and window order
    return work


def collate(batch: list[Window], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, the positions whose next token is a target, and those targets (row-major).

    No attention mask: with right padding a causal model never lets a real token see a pad, and the
    pads themselves are never read, so the mask-free (faster, fused causal) attention is exact.
    """
    width = max(len(w.ids) for w in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    keep = torch.zeros(len(batch), width, dtype=torch.bool)
    for r, w in enumerate(batch):
        n = len(w.ids)
        ids[r, :n] = torch.tensor(w.ids)
        keep[r, n - 1 - w.targets:n - 1] = True  # position p predicts token p + 1
    targets = ids[:, 1:][keep[:, :-1]]
    return ids.to(device), keep.to(device), targets.to(device)


def accepts_logits_mask(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers 5 causal LMs; a 2-D boolean
    mask applies the lm_head only at those positions, after any architecture-specific head logic)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel passes it on
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def target_logits(model, ids: torch.Tensor, keep: torch.Tensor, use_mask: bool) -> torch.Tensor:
    """(number of kept positions, vocab) logits; full-vocab logits are never built for other positions."""
    if use_mask:
        logits = model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
        if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
            return logits
        raise RuntimeError(f"{type(model).__name__}: logits_to_keep with a boolean mask returned shape "
                           f"{tuple(logits.shape)}; this transformers version slices differently")
    return model(input_ids=ids, use_cache=False).logits[keep]


def score(model, articles: list[dict], sep: int, context: int, stride: int, batch_size: int,
          device: torch.device, desc: str = "score", min_batches: int = 0, every: float = DEFAULT_EVERY,
          ends: bool = True) -> list[tuple[float, int]]:
    """Per-article (NLL sum in float64, predicted tokens). ``min_batches``: run at least this many forward
    passes (the extra ones on a one-token window, results dropped), for a sharded model whose every rank must
    take part in every forward pass (ZeRO-3). ``every``, ``ends``: the progress lines (logs.Progress)."""
    work = plan(articles, sep, context, stride)
    progress = Progress(desc, len(work), "windows", every, totals={"articles": len({w.article for w in work})},
                        rate="tokens", ends=ends, leave=ends)
    return _per_article(work, window_nll(model, work, batch_size, device, min_batches, progress), len(articles))


def window_nll(model, work: list[Window], batch_size: int, device: torch.device, min_batches: int = 0,
               progress: Progress | None = None) -> list[float]:
    """The NLL sum (float64) of each window's targets, in ``work``'s order, ``batch_size`` windows a pass;
    ``progress`` told of the windows, the articles whose every window is scored, and the tokens."""
    out = [0.0] * len(work)
    use_mask = accepts_logits_mask(model)
    left = Counter(w.article for w in work)  # windows still to score, per article
    with torch.inference_mode(), progress or contextlib.nullcontext():
        for _ in range(-(-len(work) // batch_size), min_batches):
            ids, keep, _t = collate([Window(0, [0, 0], 1)], device)
            target_logits(model, ids, keep, use_mask)
        for s in range(0, len(work), batch_size):
            batch = work[s:s + batch_size]
            ids, keep, targets = collate(batch, device)
            logits = target_logits(model, ids, keep, use_mask)
            token_nll = F.cross_entropy(logits.float(), targets, reduction="none").double()
            rows = keep.nonzero()[:, 0]  # row of every kept position, in the same row-major order
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, token_nll)
            out[s:s + len(batch)] = per_row.tolist()  # one host sync per batch
            if progress:
                left.subtract(w.article for w in batch)
                progress.update(len(batch), articles=sum(left[a] == 0 for a in {w.article for w in batch}),
                                tokens=sum(len(w.ids) for w in batch))
    return out


def _per_article(work: list[Window], window_nll: list[float], n: int) -> list[tuple[float, int]]:
    """Sum windows per article; fsum is exactly rounded, so the order windows were scored in never matters."""
    parts: list[list[float]] = [[] for _ in range(n)]
    count = [0] * n
    for w, v in zip(work, window_nll):
        parts[w.article].append(v)
        count[w.article] += w.targets
    return [(math.fsum(p), c) for p, c in zip(parts, count)]


# --------------------------------------------------------------------------- several processes


def set_threads(state, configured: int) -> int:
    """CPU threads for this rank: eval.threads; else in a SLURM task the CPUs SLURM gave it (cpus_per_task: the
    node may show more cores than the task may use); else the cores this process may use / ranks on this node."""
    if state.device.type != "cpu":
        return torch.get_num_threads()
    if not configured and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        n = max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
        torch.set_num_threads(n)
        return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    n = configured or max(1, cores // max(1, local))
    torch.set_num_threads(n)
    return n


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


# --------------------------------------------------------------------------- statistics


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) how often each article is drawn in each resample.

    Drawn on one process from (n, resamples, seed) alone, over articles in manifest order, so the
    interval does not depend on the world size; the same draws serve base and tuned (paired).
    """
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def resampled_ppl(counts: np.ndarray, nll: np.ndarray, tok: np.ndarray) -> np.ndarray:
    return np.exp(counts @ nll / np.maximum(counts @ tok, 1.0))


def interval(samples: np.ndarray) -> list[float]:
    """Percentile 95% interval."""
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def summarise(nll_sum: float, tokens: int, n_bytes: int, articles: int) -> dict[str, Any]:
    return {
        "perplexity": math.exp(nll_sum / tokens) if tokens else float("nan"),
        "nll_sum": nll_sum,
        "tokens": int(tokens),
        "articles": int(articles),
        "bytes": int(n_bytes),
        "bits_per_byte": nll_sum / LN2 / n_bytes if n_bytes else float("nan"),
    }


def per_tag(rows: list[dict], key: str, top: int) -> dict[str, dict[str, float]]:
    """Perplexity over the articles of each of the ``top`` most frequent tags (ties: alphabetical)."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for r in rows:
        for tag in r["tags"] or []:
            a = acc[tag]
            a[0] += r[f"{key}_nll"]
            a[1] += r["tokens"]
            a[2] += 1
    best = sorted(acc.items(), key=lambda kv: (-kv[1][2], kv[0]))[:top]
    return {t: {"perplexity": math.exp(v[0] / v[1]) if v[1] else float("nan"), "nll_sum": v[0],
                "tokens": int(v[1]), "articles": int(v[2])} for t, v in best}


# --------------------------------------------------------------------------- the stage


def run(cfg: Config) -> dict[str, Any]:
    state = init_distributed(timeout=watchdog.pg_timeout(cfg.run))
    e = cfg.eval
    threads = set_threads(state, e.threads)
    tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    articles = _load_split(cfg, tok)
    model = models.load_model(cfg.model.name_or_path, cfg.model.revision, DTYPES[e.dtype]).to(state.device).eval()
    has_adapter = cfg.layout.finished("train") and not cfg.model.base_only
    context, stride = effective_window(model, e.context, e.stride)
    mine = articles[state.process_index::state.num_processes]  # disjoint by article, no sampler padding
    log.info("evaluate: %d of %d %s articles on rank %d/%d, context %d, stride %d, %d threads", len(mine),
             len(articles), e.split, state.process_index, state.num_processes, context, stride, threads)
    try:
        results, seconds, merge = _score_both(cfg, model, tok, has_adapter, mine, context, stride, state.device)
    except Exception as err:
        if not memory.is_out_of_memory(err):
            raise
        raise UserError(memory.scoring_out_of_memory(state.device, e.batch_size, context)) from None
    totals = {k: _all_reduce([math.fsum(x[0] for x in v), sum(x[1] for x in v)], state) for k, v in results.items()}
    bytes_total, n_articles = _all_reduce([sum(a["n_bytes"] for a in mine), len(mine)], state)
    gathered = _gather(_article_rows(mine, results), state)
    if not state.is_main_process:
        state.wait_for_everyone()
        return {}
    try:  # rank 0 reaches the barrier even if writing fails, so no rank hangs
        rows = _in_manifest_order(gathered, articles)
        info = dict(context=context, stride=stride, has_adapter=has_adapter, world=state.num_processes,
                    seconds=seconds, threads=threads, merge=merge)
        metrics = build_metrics(cfg, rows, totals, int(round(bytes_total)), int(round(n_articles)), info)
        _write_outputs(cfg, rows, metrics)
    finally:
        state.wait_for_everyone()
    return metrics


def _load_split(cfg: Config, tok) -> list[dict]:
    manifest = shards.read_manifest(cfg.shards_url, cfg.data.storage_options, cfg.data.retry_seconds)
    shards.check_tokenizer(manifest, models.tokenizer_fingerprint(tok), cfg.model.name_or_path, cfg.shards_url)
    articles = stream.load_articles(cfg.shards_url, manifest, cfg.data.storage_options, cfg.eval.split,
                                    retry_seconds=cfg.data.retry_seconds)
    if not articles:
        raise UserError(f"eval.split={cfg.eval.split}: the prepared dataset has no articles in this split")
    return articles[:cfg.eval.max_articles] if cfg.eval.max_articles else articles


def effective_window(model, context: int, stride: int) -> tuple[int, int]:
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or context
    if context > limit:
        log.warning("eval.context=%d is longer than the model's %d positions: using %d", context, limit, limit)
    context = min(context, limit)
    return context, min(stride, context - 1)


def _score_both(cfg: Config, model, tok, has_adapter: bool, mine: list[dict], context: int, stride: int,
                device: torch.device) -> tuple[dict[str, list], dict[str, float], dict[str, Any]]:
    """Base, then tuned: the run's adapter put on the same model, merged into its weights when the merged
    logits match (models.attach_adapter), so that the tuned pass costs what the base pass costs."""
    e = cfg.eval
    results, seconds, merge = {}, {}, {}
    t0 = time.perf_counter()
    results["base"] = score(model, mine, tok.eos_token_id, context, stride, e.batch_size, device, "eval base",
                            every=cfg.run.progress_every)
    seconds["base"] = time.perf_counter() - t0
    if has_adapter:
        model, merged, diff = models.attach_adapter(model, cfg.layout.adapter, tok, e.merge_tolerance,
                                                    "eval.merge_tolerance")
        log.info("adapter %s (merged: %s, relative logit difference %.1e)",
                 models.adapter_fingerprint(cfg.layout.adapter), merged, diff)
        merge = {"adapter_merged": merged, "merge_difference": None if math.isnan(diff) else diff}
        t0 = time.perf_counter()
        results["tuned"] = score(model, mine, tok.eos_token_id, context, stride, e.batch_size, device,
                                 "eval tuned", every=cfg.run.progress_every)
        seconds["tuned"] = time.perf_counter() - t0
    return results, seconds, merge


def _article_rows(mine: list[dict], results: dict[str, list]) -> list[dict]:
    return [{"id": a["id"], "tags": list(a["tags"] or []), "bytes": int(a["n_bytes"]),
             "tokens": results["base"][j][1], **{f"{k}_nll": v[j][0] for k, v in results.items()}}
            for j, a in enumerate(mine)]


def _in_manifest_order(gathered: list[list[dict]], articles: list[dict]) -> list[dict]:
    order = {a["id"]: i for i, a in enumerate(articles)}
    return sorted((r for part in gathered for r in part), key=lambda r: order[r["id"]])


def build_metrics(cfg: Config, rows: list[dict], totals: dict, n_bytes: int, n_articles: int,
                  info: dict) -> dict[str, Any]:
    """metrics.json (schema in docs/evaluate.md)."""
    e = cfg.eval
    provenance = {
        "method": METHOD, "context": info["context"], "stride": info["stride"], "model": cfg.model.name_or_path,
        "model_fingerprint": models.model_fingerprint(cfg.model.name_or_path),
        "adapter_fingerprint": models.adapter_fingerprint(cfg.layout.adapter) if info["has_adapter"] else "",
    }
    out: dict[str, Any] = {"split": e.split, **provenance, "world_size": info["world"],
                           "bootstrap": {"resamples": e.bootstrap, "seed": e.seed, "unit": "article"}}
    trained = run_records.read(cfg.layout, "train") if info["has_adapter"] else None
    if trained:  # which step the scored adapter is, and why training stopped (medgen/validate.py)
        r = trained["resolved"]
        out["training"] = {k: r.get(k) for k in ("adapter_step", "adapter_choice", "steps", "stopped")}
    tok = np.array([r["tokens"] for r in rows], dtype=np.float64)
    counts = bootstrap_counts(len(rows), e.bootstrap, e.seed)
    boots = {}
    for k, (nll_sum, tokens) in totals.items():
        boots[k] = resampled_ppl(counts, np.array([r[f"{k}_nll"] for r in rows], dtype=np.float64), tok)
        block = summarise(nll_sum, int(round(tokens)), n_bytes, n_articles)
        block["ci95"] = interval(boots[k])
        block["per_tag"] = per_tag(rows, k, e.top_tags)
        out[k] = {**block, **provenance}
        if k == "base":
            out[k]["adapter_fingerprint"] = ""  # the model before the adapter was put on
        else:
            out[k].update(info["merge"])
    if "tuned" in out:
        out["delta"] = {
            "perplexity": out["tuned"]["perplexity"] - out["base"]["perplexity"],
            "ratio": out["tuned"]["perplexity"] / out["base"]["perplexity"],
            "ci95": interval(boots["tuned"] - boots["base"]),  # paired: the same resampled articles
            "ratio_ci95": interval(boots["tuned"] / boots["base"]),
        }
    out["timing"] = _timing(info, out)
    return out


def _timing(info: dict, out: dict) -> dict[str, Any]:
    """Rank 0's wall clock per model (all ranks score at once, so tokens/s is the whole job's)."""
    timing: dict[str, Any] = {"threads_per_rank": info["threads"]}
    for k, sec in info["seconds"].items():
        timing[f"{k}_seconds"] = round(sec, 3)
        timing[f"{k}_tokens_per_s"] = round(out[k]["tokens"] / sec, 1) if sec else None
    return timing


def _write_outputs(cfg: Config, rows: list[dict], metrics: dict) -> None:
    """The eval folder as a whole, with the record of what ran: the previous one stays until the new one is
    complete."""
    layout = cfg.layout
    with disk_errors(layout.eval, "the evaluation output", "the previous evaluation output, if any, is kept"), \
            atomic.directory(layout.eval) as tmp:
        (tmp / layout.eval_articles.name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (tmp / layout.metrics.name).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        run_records.write(cfg, "evaluate", tmp, world_size=metrics["world_size"], context=metrics["context"],
                         stride=metrics["stride"], model_fingerprint=metrics["model_fingerprint"],
                         adapter_fingerprint=metrics["adapter_fingerprint"])
