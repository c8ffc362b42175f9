"""The per-article work of prepare, on a chunk of CSV records at a time: clean, check, language ID, MinHash,
tokenize. Nothing here depends on other articles, so chunks run in any process (medgen/data/workers.py);
what does depend on order (first copy wins, counts) is decided in prepare from what this returns."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from medgen.data import clean, filters, read, split
from medgen.data.storage import redact

# a title, URL, author or tag list or timestamp longer than this is a broken row (a stray quote joined
# lines), not metadata; real ones are under 1000 characters
MAX_META_CHARS = 10_000


def document(title: str, body: str) -> str:
    """The text a model trains on and is scored on: title, blank line, body."""
    return f"{title}\n\n{body}" if title else body


@dataclass
class Outcome:
    """One record's verdict. ``drop``: a reason that needs no other article; else the keys the order-dependent
    checks need and the finished article (None when its language is not wanted)."""

    drop: str | None = None
    utf8_replaced: bool = False
    exact_key: bytes = b""
    language: str | None = None  # the detected code when data.languages filters
    band_keys: list[int] | None = None
    article: dict | None = None
    warnings: list[str] = field(default_factory=list)  # counted only if the article is kept


@dataclass
class Chunk:
    outcomes: list[Outcome]
    cleaned: Counter
    cleaned_chars: Counter
    seconds: Counter  # CPU seconds of each step (clean, dedup, language, metadata, tokenize) in this chunk


class ArticleWork:
    """Everything one process needs for the per-article work: cleaning rules, language model, MinHash, tokenizer."""

    def __init__(self, d, tok):
        self.d, self.tok = d, tok
        self.cols = read.Columns.from_config(d)
        self.meta = [c for c in vars(self.cols).values() if c != self.cols.text]
        self.language = filters.LanguageFilter(d.languages) if d.languages else None
        self.minhash = filters.MinHashBands(d.near_dup_threshold, d.near_dup_num_perm) if d.near_dup_threshold else None
        self.backend = _plain_copy(getattr(tok, "backend_tokenizer", None))

    def __call__(self, records: list[dict[str, str]]) -> Chunk:
        chunk = Chunk([], Counter(), Counter(), Counter())
        for rec in records:
            chunk.outcomes.append(self._one(rec, chunk))
        self._tokenize([o.article for o in chunk.outcomes if o.article], chunk.seconds)
        return chunk

    def _one(self, rec: dict[str, str], chunk: Chunk) -> Outcome:
        body = rec[self.cols.text]
        if any(c and len(rec[c]) > MAX_META_CHARS for c in self.meta):
            return Outcome(drop="field_too_long")
        if not body.strip():
            return Outcome(drop="missing_text")
        out = Outcome(utf8_replaced=any("\ufffd" in v for v in rec.values()))
        lap = _Laps(chunk.seconds)
        body = clean.clean_text(body, self.d.clean_rules, chunk.cleaned, chunk.cleaned_chars)
        lap("clean")
        if len(body) < self.d.min_chars:
            out.drop = "too_short"
        elif len(body) > self.d.max_chars:
            out.drop = "too_long"
        if out.drop:
            return out
        normal = clean.normalise_for_dedup(body)
        out.exact_key = filters.exact_key(normal)
        lap("dedup")
        if self.language:
            out.language = self.language.detect(body)
            lap("language")
            if out.language not in self.language.languages:
                return out  # its exact key still counts: the first copy of a text wins whatever its language
        if self.minhash:
            out.band_keys = self.minhash.keys(normal)
            lap("dedup")
        out.article = self._article(rec, body, out.warnings)
        lap("metadata")
        return out

    def _article(self, rec: dict[str, str], body: str, warnings: list[str]) -> dict:
        d, cols = self.d, self.cols
        title = clean.clean_text(rec[cols.title], d.clean_rules) if cols.title else ""
        url = rec[cols.url] if cols.url else ""
        aid = split.article_id(url, title, body)
        return {
            "id": aid, "title": title, "text": body, "url": redact(url),
            "tags": _field(rec, cols.tags, "tags", read.parse_list, [], warnings),
            "authors": _field(rec, cols.authors, "authors", read.parse_list, [], warnings),
            "timestamp": _field(rec, cols.timestamp, "timestamp", read.parse_timestamp, "", warnings),
            "document": document(title, body),
            "split": split.assign_split(aid, d.val_fraction, d.test_fraction),
            "shard": split.assign_shard(aid, d.num_shards),
        }

    def _tokenize(self, articles: list[dict], seconds: Counter) -> None:
        """One batch call of the Rust tokenizer without offsets (``encode_batch_fast``): the same ids as ``tok(docs)``."""
        if not articles:
            return
        lap = _Laps(seconds)
        docs = [a.pop("document") for a in articles]
        if self.backend:
            ids = [enc.ids for enc in self.backend.encode_batch_fast(docs, add_special_tokens=False)]
        else:
            ids = self.tok(docs, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for doc, article, toks in zip(docs, articles, ids):
            # int32 array: 4 bytes a token, where a list of Python ints costs ~36 while it waits in a shard buffer
            article.update(input_ids=np.asarray(toks, dtype=np.int32), n_tokens=len(toks),
                           n_bytes=len(doc.encode("utf-8")))
        lap("tokenize")


class _Laps:
    """Adds the CPU time since the previous lap to ``seconds[step]``."""

    def __init__(self, seconds: Counter):
        self.seconds, self.last = seconds, time.process_time()

    def __call__(self, step: str) -> None:
        now = time.process_time()
        self.seconds[step] += now - self.last
        self.last = now


def _plain_copy(backend):
    """An own copy of a Rust tokenizer with no truncation or padding left set on it (``tok()`` clears both per call)."""
    if backend is None:
        return None
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    return own


def _field(rec: dict[str, str], column: str, name: str, parse, empty, warnings: list[str]):
    """A parsed metadata field; an unparsable one is cleared (and counted if the article is kept)."""
    if not column:
        return empty
    value = parse(rec[column])
    if value is None:
        warnings.append(f"{name}_unparsable_cleared")
        return empty
    return value
