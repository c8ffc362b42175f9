"""Stage 1, prepare: raw CSV -> clean -> filter/dedup -> split by article -> tokenized Parquet shards."""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from typing import Any

from tqdm.auto import tqdm

from medgen import models
from medgen.config import Config
from medgen.data import clean, read, shards, split
from medgen.errors import UserError

log = logging.getLogger(__name__)


def document(title: str, body: str) -> str:
    """The text a model trains on and is scored on: title, blank line, body."""
    return f"{title}\n\n{body}" if title else body


def run(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    problems = clean.check_rules(d.clean_rules)
    if problems:
        raise UserError(problems[0])
    tok = models.load_tokenizer(cfg.model.name_or_path, cfg.model.revision)
    cols = read.Columns.from_config(d)
    out_url = cfg.shards_url
    t0 = time.time()
    source = read.open_source(d.source, d.storage_options)
    writer = shards.ShardWriter(out_url, d.storage_options, d.num_shards)
    dropped: Counter[str] = Counter()
    rule_hits: dict[str, int] = {}
    warnings: Counter[str] = Counter()
    seen: set[bytes] = set()
    rows_read = 0
    try:
        bar = tqdm(desc="prepare", unit=" rows", disable=None)
        for chunk in read.iter_chunks(source, cols, d.chunk_rows, d.source):
            rows_read += len(chunk)
            docs, metas = [], []
            for rec in chunk.to_dict("records"):
                kept = _clean_row(rec, cols, d, rule_hits, dropped, warnings, seen)
                if kept is not None:
                    docs.append(kept.pop("document"))
                    metas.append(kept)
            # batched: the fast tokenizer encodes the whole chunk in parallel
            ids = tok(docs, add_special_tokens=False)["input_ids"] if docs else []
            for doc, meta, toks in zip(docs, metas, ids):
                meta.update(input_ids=toks, n_tokens=len(toks), n_bytes=len(doc.encode("utf-8")))
                writer.add(meta.pop("split"), meta.pop("shard"), meta)
            bar.update(len(chunk))
        bar.close()
        split_stats = writer.finish()
        kept_total = sum(s["articles"] for s in split_stats.values())
        report = {
            "source": read.redact(d.source),
            "source_sha256": source.sha256.hexdigest(),
            "source_bytes": source.bytes,
            "rows_read": rows_read,
            "rows_kept": kept_total,
            "rows_dropped": sum(dropped.values()),
            "dropped": dict(sorted(dropped.items())),
            "cleaned": rule_hits,
            "warnings": dict(sorted(warnings.items())),
            "splits": {k: {"articles": v["articles"], "tokens": v["tokens"]} for k, v in split_stats.items()},
            "seconds": round(time.time() - t0, 2),
        }
        assert report["rows_kept"] + report["rows_dropped"] == rows_read, report
        manifest = {
            "format": "medgen-shards/1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"url": read.redact(d.source), "sha256": report["source_sha256"], "bytes": source.bytes},
            "config_hash": _data_config_hash(cfg),
            "tokenizer": {
                "name": cfg.model.name_or_path,
                "fingerprint": models.tokenizer_fingerprint(tok),
                "eos_token_id": tok.eos_token_id,
            },
            "num_shards": d.num_shards,
            "splits": split_stats,
        }
        writer.publish(manifest, report)
    except BaseException:
        writer.abort()
        raise
    log.info("prepare: %d rows read, %d kept, %d dropped -> %s", rows_read, kept_total, report["rows_dropped"], read.redact(out_url))
    return report


def _clean_row(rec, cols, d, rule_hits, dropped, warnings, seen) -> dict | None:
    """Clean and classify one CSV row; None (and a counted reason) when it is dropped."""
    raw_text = rec.get(cols.text, "")
    if not raw_text.strip():
        dropped["missing_text"] += 1
        return None
    if "\ufffd" in raw_text:
        warnings["invalid_utf8_replaced"] += 1
    title = clean.clean_text(rec.get(cols.title, ""), d.clean_rules) if cols.title else ""
    body = clean.clean_text(raw_text, d.clean_rules, rule_hits)
    if len(body) < d.min_chars:
        dropped["too_short"] += 1
        return None
    if len(body) > d.max_chars:
        dropped["too_long"] += 1
        return None
    key = hashlib.blake2b(clean.normalise_for_dedup(body).encode(), digest_size=16).digest()
    if key in seen:
        dropped["duplicate_exact"] += 1
        return None
    seen.add(key)
    url = rec.get(cols.url, "") if cols.url else ""
    aid = split.article_id(url, title, body)
    tags = read.parse_list(rec.get(cols.tags, "")) if cols.tags else []
    if tags is None:
        warnings["tags_unparsable_cleared"] += 1
        tags = []
    authors = read.parse_list(rec.get(cols.authors, "")) if cols.authors else []
    if authors is None:
        warnings["authors_unparsable_cleared"] += 1
        authors = []
    ts = read.parse_timestamp(rec.get(cols.timestamp, "")) if cols.timestamp else ""
    if ts is None:
        warnings["timestamp_unparsable_cleared"] += 1
        ts = ""
    return {
        "id": aid, "title": title, "text": body, "url": read.redact(url), "tags": tags, "authors": authors,
        "timestamp": ts, "document": document(title, body),
        "split": split.assign_split(aid, d.val_fraction, d.test_fraction),
        "shard": split.assign_shard(aid, d.num_shards),
    }


def _data_config_hash(cfg: Config) -> str:
    import json

    d = {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("storage_options", "shards")}
    d["tokenizer"] = cfg.model.name_or_path
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def print_report(report: dict[str, Any]) -> str:
    lines = [
        f"rows read    {report['rows_read']:>8}",
        f"rows kept    {report['rows_kept']:>8}",
        f"rows dropped {report['rows_dropped']:>8}",
    ]
    lines += [f"  {k:<24}{v:>6}" for k, v in report["dropped"].items()]
    if report["warnings"]:
        lines.append("kept with a field cleared or repaired:")
        lines += [f"  {k:<24}{v:>6}" for k, v in report["warnings"].items()]
    lines.append("cleaning rules (articles changed):")
    lines += [f"  {k:<24}{v:>6}" for k, v in report["cleaned"].items()]
    lines.append("splits:")
    lines += [f"  {k:<12}{v['articles']:>6} articles {v['tokens']:>10} tokens" for k, v in report["splits"].items()]
    return "\n".join(lines)
