"""Stage 1, prepare: raw CSV -> clean -> filter/dedup -> split by article -> tokenized Parquet shards."""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medgen import models
from medgen.config import Config, DataConfig
from medgen.data import clean, filters, read, shards, split
from medgen.data.storage import redact
from medgen.errors import UserError

log = logging.getLogger(__name__)


def document(title: str, body: str) -> str:
    """The text a model trains on and is scored on: title, blank line, body."""
    return f"{title}\n\n{body}" if title else body


# articles per tokenizer call: the fast tokenizer's per-token encodings (~100 B a token) of a whole
# chunk would cost hundreds of MB; 64 articles keep its batch parallelism
TOKENIZE_BATCH = 64

# a title, URL, author or tag list or timestamp longer than this is a broken row (a stray quote joined
# lines), not metadata; real ones are under 1000 characters
MAX_META_CHARS = 10_000

# every reason a row can be dropped, in pipeline order; the printed table lists each, zeros included
DROP_REASONS = (
    "wrong_field_count", "malformed_quoting",  # parse errors (medgen/data/read.py)
    "field_too_long", "missing_text", "too_short", "too_long",
    "duplicate_exact", "wrong_language", "duplicate_near",
)


def run(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    problems = clean.check_rules(d.clean_rules)
    if problems:
        raise UserError(problems[0])
    rows = RowFilter(d)
    tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    t0 = time.time()
    source = read.open_source(d.source, d.storage_options, d.retry_seconds)
    writer = shards.ShardWriter(cfg.shards_url, d.storage_options, d.num_shards, d.retry_seconds)
    try:
        rows_read = _write_articles(source, rows, tok, writer, d)
        split_stats = writer.finish()
        report = _report(d, source, rows, rows_read, split_stats, time.time() - t0)
        writer.publish(_manifest(cfg, source, tok, split_stats), report)
    except BaseException:
        writer.abort()
        raise
    log.info("prepare: %d rows read, %d kept, %d dropped -> %s", rows_read, report["rows_kept"],
             report["rows_dropped"], redact(cfg.shards_url))
    return report


def _write_articles(source: read.HashingReader, rows: "RowFilter", tok, writer: shards.ShardWriter, d: DataConfig) -> int:
    """Read, filter, tokenize and write every article; returns the number of data rows read."""
    rows_read = 0
    bar = tqdm(desc="prepare", unit=" rows", disable=None)
    for batch in read.iter_batches(source, read.Columns.from_config(d), d.chunk_rows, d.source):
        rows_read += batch.rows
        rows.dropped.update(batch.malformed)
        kept = [k for k in map(rows.keep, batch.records) if k is not None]
        for start in range(0, len(kept), TOKENIZE_BATCH):
            _tokenize_and_write(kept[start:start + TOKENIZE_BATCH], tok, writer)
        bar.update(batch.rows)
    bar.close()
    return rows_read


def _tokenize_and_write(articles: list[dict], tok, writer: shards.ShardWriter) -> None:
    docs = [a.pop("document") for a in articles]
    ids = tok(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    for doc, meta, toks in zip(docs, articles, ids):
        # int32 array: 4 bytes a token, where a list of Python ints costs ~36 while it waits in a shard buffer
        meta.update(input_ids=np.asarray(toks, dtype=np.int32), n_tokens=len(toks), n_bytes=len(doc.encode("utf-8")))
        writer.add(meta.pop("split"), meta.pop("shard"), meta)


def _report(d: DataConfig, source: read.HashingReader, rows: "RowFilter", rows_read: int,
            split_stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    report = {
        "source": redact(d.source),
        "source_sha256": source.sha256.hexdigest(),
        "source_bytes": source.bytes,
        "rows_read": rows_read,
        "rows_kept": sum(s["articles"] for s in split_stats.values()),
        "rows_dropped": sum(rows.dropped.values()),
        "dropped": {k: rows.dropped[k] for k in DROP_REASONS if rows.dropped[k]},  # the table shows the zeros
        "cleaned": {k: rows.cleaned.get(k, 0) for k in d.clean_rules},
        "cleaned_chars": {k: rows.cleaned_chars.get(k, 0) for k in d.clean_rules},
        "languages_dropped": dict(rows.languages_dropped.most_common()),
        "warnings": dict(sorted(rows.warnings.items())),
        "splits": {k: {"articles": v["articles"], "tokens": v["tokens"]} for k, v in split_stats.items()},
        "seconds": round(seconds, 2),
    }
    if report["rows_kept"] + report["rows_dropped"] != rows_read:
        raise RuntimeError(f"prepare lost track of rows: {report}")
    return report


def _manifest(cfg: Config, source: read.HashingReader, tok, split_stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "medgen-shards/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"url": redact(cfg.data.source), "sha256": source.sha256.hexdigest(), "bytes": source.bytes},
        "config_hash": _data_config_hash(cfg),
        "tokenizer": {
            "name": cfg.model.name_or_path,
            "fingerprint": models.tokenizer_fingerprint(tok),
            "eos_token_id": tok.eos_token_id,
        },
        "num_shards": cfg.data.num_shards,
        "splits": split_stats,
    }


class RowFilter:
    """Cleans and classifies CSV records one by one, counting every drop, change and repair."""

    def __init__(self, d: DataConfig):
        self.d = d
        self.cols = read.Columns.from_config(d)
        self.meta = [c for c in vars(self.cols).values() if c != self.cols.text]
        self.dropped: Counter[str] = Counter()
        self.cleaned: dict[str, int] = {}
        self.cleaned_chars: dict[str, int] = {}
        self.warnings: Counter[str] = Counter()
        self.languages_dropped: Counter[str] = Counter()
        self.exact = filters.ExactDuplicates()
        self.language = filters.LanguageFilter(d.languages) if d.languages else None
        self.near = filters.NearDuplicates(d.near_dup_threshold, d.near_dup_num_perm) if d.near_dup_threshold else None

    def keep(self, rec: dict[str, str]) -> dict | None:
        """The article (with its split and shard) or None, its drop reason counted."""
        body = rec[self.cols.text]
        if any(c and len(rec[c]) > MAX_META_CHARS for c in self.meta):
            reason = "field_too_long"
        elif not body.strip():
            reason = "missing_text"
        else:
            if any("\ufffd" in v for v in rec.values()):
                self.warnings["invalid_utf8_replaced"] += 1
            body = clean.clean_text(body, self.d.clean_rules, self.cleaned, self.cleaned_chars)
            reason = self._drop_reason(body)
        if reason:
            self.dropped[reason] += 1
            return None
        return self._article(rec, body)

    def _drop_reason(self, body: str) -> str | None:
        """Cheap checks first; the duplicate indexes only remember articles that passed the checks before."""
        if len(body) < self.d.min_chars:
            return "too_short"
        if len(body) > self.d.max_chars:
            return "too_long"
        if self.exact.check_and_add(body):
            return "duplicate_exact"
        if self.language:
            lang = self.language.detect(body)
            if lang not in self.language.languages:
                self.languages_dropped[lang] += 1
                return "wrong_language"
        if self.near and self.near.check_and_add(body):
            return "duplicate_near"
        return None

    def _article(self, rec: dict[str, str], body: str) -> dict:
        d, cols = self.d, self.cols
        title = clean.clean_text(rec[cols.title], d.clean_rules) if cols.title else ""
        url = rec[cols.url] if cols.url else ""
        aid = split.article_id(url, title, body)
        return {
            "id": aid, "title": title, "text": body, "url": redact(url),
            "tags": self._field(rec, cols.tags, "tags", read.parse_list, []),
            "authors": self._field(rec, cols.authors, "authors", read.parse_list, []),
            "timestamp": self._field(rec, cols.timestamp, "timestamp", read.parse_timestamp, ""),
            "document": document(title, body),
            "split": split.assign_split(aid, d.val_fraction, d.test_fraction),
            "shard": split.assign_shard(aid, d.num_shards),
        }

    def _field(self, rec: dict[str, str], column: str, name: str, parse, empty):
        """A parsed metadata field; unparsable ones are cleared and counted, the article is kept."""
        if not column:
            return empty
        value = parse(rec[column])
        if value is None:
            self.warnings[f"{name}_unparsable_cleared"] += 1
            return empty
        return value


def _data_config_hash(cfg: Config) -> str:
    import json

    d = {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("storage_options", "shards", "retry_seconds")}
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
