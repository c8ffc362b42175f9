"""Stage 1, prepare: raw CSV -> clean -> filter/dedup -> split by article -> tokenized Parquet shards."""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, deque
from typing import Any, Iterator

from medgen import models, provenance
from medgen.config import Config, DataConfig
from medgen.data import articles, clean, filters, read, shards, workers
from medgen.data.storage import redact
from medgen.errors import UserError
from medgen.logs import Progress

log = logging.getLogger(__name__)


# articles per chunk handed to a worker (and per tokenizer call): big enough that handing over costs little,
# small enough that the fast tokenizer's per-token encodings (~100 B a token) stay a few MB
CHUNK_ARTICLES = 64

# every reason a row can be dropped, in pipeline order; the printed table lists each, zeros included
DROP_REASONS = (
    "wrong_field_count", "malformed_quoting",  # parse errors (medgen/data/read.py)
    "field_too_long", "missing_text", "too_short", "too_long",
    "duplicate_exact", "wrong_language", "duplicate_near",
)
STEPS = ("read", "clean", "dedup", "language", "metadata", "tokenize", "write")  # cpu_seconds in the report


def run(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    problems = clean.check_rules(d.clean_rules)
    if problems:
        raise UserError(problems[0])
    # the sources and the destination first: a mistake there costs seconds, not the tokenizer and language model
    urls = read.source_urls(d.source, d.storage_options, d.retry_seconds)
    size = read.total_bytes(urls, d.storage_options, d.retry_seconds)  # for the progress lines
    writer = shards.ShardWriter(cfg.shards_url, d.storage_options, d.num_shards, d.retry_seconds)
    try:
        tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
        work = articles.ArticleWork(d, tok)
        n_workers = workers.resolve(d.workers)
        log.info("prepare: %d worker process%s (data.workers=%d)", n_workers, "es" * (n_workers > 1), d.workers)
        t0, cpu0 = time.time(), time.process_time()
        decide = Decisions(d, work.minhash.bands if work.minhash else 0)
        with Progress("prepare", size, "bytes", cfg.run.progress_every) as progress:
            files = _write_articles(urls, work, n_workers, decide, writer, d, progress)
        t = time.process_time()
        split_stats = writer.finish()
        decide.seconds["write"] += time.process_time() - t
        timing = {"seconds": round(time.time() - t0, 2), "workers": n_workers,
                  "cpu_seconds": {k: round(decide.seconds[k], 2) for k in STEPS},
                  "parent_cpu_seconds": round(time.process_time() - cpu0, 2)}  # all of it when workers=1
        report = _report(d, files, decide, split_stats, timing)
        writer.publish(_manifest(cfg, files, tok, split_stats), report,
                       provenance.record(cfg, "prepare", workers=n_workers, tokenizer_fingerprint=models.tokenizer_fingerprint(tok)))
    except BaseException:
        writer.abort()
        raise
    log.info("prepare: %d rows read, %d kept, %d dropped in %.1f s -> %s", decide.rows_read, report["rows_kept"],
             report["rows_dropped"], report["timing"]["seconds"], redact(cfg.shards_url))
    return report


def _write_articles(urls: list[str], work: articles.ArticleWork, n_workers: int, decide: "Decisions",
                    writer: shards.ShardWriter, d: DataConfig, progress: Progress) -> list[dict]:
    """Read every source file in order, do the per-article work on ``n_workers`` processes and decide and write
    in input order (the same output for any number); returns each file's URL, sha256 and size."""
    files: list[dict] = []
    for chunk in workers.imap_ordered(work, _chunks(urls, d, decide, files), n_workers):
        t = time.process_time()
        for article in decide.add(chunk):
            writer.add(article.pop("split"), article.pop("shard"), article)
        decide.seconds["write"] += time.process_time() - t
        progress.update(decide.chunk_bytes.popleft(), rows=len(chunk.outcomes))
    return files


def _chunks(urls: list[str], d: DataConfig, decide: "Decisions", files: list[dict]) -> Iterator[list[dict]]:
    """The records of every file, ``CHUNK_ARTICLES`` at a time; malformed rows are counted here."""
    cols = read.Columns.from_config(d)
    for url in urls:
        source = read.open_source(url, d.storage_options, d.retry_seconds)
        batches = read.iter_batches(source, cols, d.chunk_rows, url)
        counted = 0  # bytes of this file given to chunks
        while True:
            t = time.process_time()
            batch = next(batches, None)
            decide.seconds["read"] += time.process_time() - t
            if batch is None:
                break
            decide.rows_read += batch.rows
            decide.dropped.update(batch.malformed)
            if batch.records:  # the batch's bytes shared by its chunks, so that progress follows the work done
                share, counted = (source.bytes - counted) / len(batch.records), source.bytes
            for start in range(0, len(batch.records), CHUNK_ARTICLES):
                decide.chunk_bytes.append(share * len(batch.records[start:start + CHUNK_ARTICLES]))
                yield batch.records[start:start + CHUNK_ARTICLES]
        files.append({"url": redact(url), "sha256": source.sha256.hexdigest(), "bytes": source.bytes})


def _report(d: DataConfig, files: list[dict], decide: "Decisions", split_stats: dict[str, Any],
            timing: dict[str, Any]) -> dict[str, Any]:
    report = {
        "source": _redacted(d.source),
        **({"source_sha256": files[0]["sha256"]} if len(files) == 1 else {"source_files": files}),
        "source_bytes": sum(f["bytes"] for f in files),
        "rows_read": decide.rows_read,
        "rows_kept": sum(s["articles"] for s in split_stats.values()),
        "rows_dropped": sum(decide.dropped.values()),
        "dropped": {k: decide.dropped[k] for k in DROP_REASONS if decide.dropped[k]},  # the table shows the zeros
        "cleaned": {k: decide.cleaned.get(k, 0) for k in d.clean_rules},
        "cleaned_chars": {k: decide.cleaned_chars.get(k, 0) for k in d.clean_rules},
        "languages_dropped": dict(sorted(decide.languages_dropped.items(), key=lambda kv: (-kv[1], kv[0]))),
        "warnings": dict(sorted(decide.warnings.items())),
        "splits": {k: {"articles": v["articles"], "tokens": v["tokens"]} for k, v in split_stats.items()},
        "timing": timing,  # the only part that depends on the machine and data.workers
    }
    if report["rows_kept"] + report["rows_dropped"] != decide.rows_read:
        raise RuntimeError(f"prepare lost track of rows: {report}")
    return report


def _redacted(source: str | list[str]) -> str | list[str]:
    return redact(source) if isinstance(source, str) else [redact(u) for u in source]


def _manifest(cfg: Config, files: list[dict], tok, split_stats: dict[str, Any]) -> dict[str, Any]:
    source: dict[str, Any] = {"url": _redacted(cfg.data.source), "bytes": sum(f["bytes"] for f in files)}
    source.update({"sha256": files[0]["sha256"]} if len(files) == 1 else {"files": files})
    return {
        "format": "medgen-shards/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "config_hash": _data_config_hash(cfg),
        "tokenizer": {
            "name": cfg.model.name_or_path,
            "fingerprint": models.tokenizer_fingerprint(tok),
            "eos_token_id": tok.eos_token_id,
        },
        "num_shards": cfg.data.num_shards,
        "splits": split_stats,
    }


class Decisions:
    """What depends on input order, in one process: exact and near-duplicate "first copy wins", and every count."""

    def __init__(self, d: DataConfig, bands: int):
        self.rows_read = 0
        self.chunk_bytes: deque[float] = deque()  # each chunk's share of the source bytes, in order (progress)
        self.dropped: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self.languages_dropped: Counter[str] = Counter()
        self.cleaned: Counter[str] = Counter()
        self.cleaned_chars: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()  # CPU seconds per step, summed over the processes
        self.exact = filters.ExactDuplicates()
        self.near = filters.NearDuplicates(bands) if bands else None

    def add(self, chunk: articles.Chunk) -> list[dict]:
        """The chunk's articles to keep, in order; every other record's reason is counted."""
        self.cleaned.update(chunk.cleaned)
        self.cleaned_chars.update(chunk.cleaned_chars)
        self.seconds.update(chunk.seconds)
        kept = []
        for o in chunk.outcomes:
            reason = self._drop_reason(o)
            if reason:
                self.dropped[reason] += 1
            else:
                self.warnings.update(o.warnings)
                kept.append(o.article)
        return kept

    def _drop_reason(self, o: articles.Outcome) -> str | None:
        """In the order of the checks; the exact index remembers every article that passed the length checks, the
        near index every one that also passed the language check."""
        if o.utf8_replaced:
            self.warnings["invalid_utf8_replaced"] += 1
        if o.drop:
            return o.drop
        if self.exact.check_and_add(o.exact_key):
            return "duplicate_exact"
        if o.article is None:
            self.languages_dropped[o.language] += 1
            return "wrong_language"
        if self.near and self.near.check_and_add(o.band_keys):
            return "duplicate_near"
        return None


def _data_config_hash(cfg: Config) -> str:
    import json

    # what cannot change the output stays out: where it goes, how it is read and on how many workers
    ignored = ("storage_options", "shards", "retry_seconds", "workers")
    d = {k: v for k, v in cfg.to_dict()["data"].items() if k not in ignored}
    d["tokenizer"] = cfg.model.name_or_path
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def print_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (the CLI prints it after ``medgen prepare``)."""
    row = "  {:<30}{:>10}".format
    lines = [f"{'rows read':<32}{report['rows_read']:>10}", f"{'rows kept':<32}{report['rows_kept']:>10}",
             f"{'rows dropped':<32}{report['rows_dropped']:>10}"]
    lines += [row(k, report["dropped"].get(k, 0)) for k in DROP_REASONS]
    if report["languages_dropped"]:
        lines.append("  wrong_language by detected language: "
                     + ", ".join(f"{k} {v}" for k, v in report["languages_dropped"].items()))
    if report["warnings"]:
        lines.append("kept with a field cleared or repaired:")
        lines += [row(k, v) for k, v in report["warnings"].items()]
    lines.append(f"{'cleaning rules':<32}{'articles':>10}{'chars removed':>15}")
    lines += [row(k, v) + f"{report['cleaned_chars'].get(k, 0):>15}" for k, v in report["cleaned"].items()]
    lines.append(f"{'splits':<32}{'articles':>10}{'tokens':>15}")
    lines += [row(k, v["articles"]) + f"{v['tokens']:>15}" for k, v in report["splits"].items()]
    return "\n".join(lines)
