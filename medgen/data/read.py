"""Read the articles CSV from any fsspec URL, in batches, hashing the raw bytes as they stream by."""
from __future__ import annotations

import ast
import csv
import glob
import hashlib
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from medgen.data.retry import RETRY_SECONDS, retrying
from medgen.data.storage import first_line, is_glob, is_local, local_path, redact, storage_errors, url_to_fs
from medgen.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Columns:
    title: str
    text: str
    url: str
    tags: str
    authors: str
    timestamp: str

    @classmethod
    def from_config(cls, d) -> "Columns":
        return cls(d.title_column, d.text_column, d.url_column, d.tags_column, d.authors_column, d.timestamp_column)


class HashingReader(io.RawIOBase):
    """A read-only byte stream that hashes and counts what passes through it.

    With ``reopen`` (a function that opens the source again) a read that fails in an outage is retried
    from the byte reached, on a fresh connection, so no byte is read twice or skipped."""

    def __init__(self, raw, reopen=None, url: str = "", retry_seconds: float = 0):
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0
        self.reopen, self.url, self.retry_seconds = reopen, url, retry_seconds

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        if self.raw is None:
            self.raw = self.reopen()
            self.raw.seek(self.bytes)
        try:
            return self.raw.read(n)
        except Exception:
            if self.reopen:
                self.raw = None
            raise

    def readinto(self, b) -> int:
        if self.reopen is None:
            data = self._read(len(b))
        else:
            data = retrying(lambda: self._read(len(b)), "data.source", self.url, self.retry_seconds)
        n = len(data)
        b[:n] = data
        self.sha256.update(data)
        self.bytes += n
        return n


def open_source(url: str, storage_options: dict, retry_seconds: float = RETRY_SECONDS) -> HashingReader:
    fs, path = url_to_fs("data.source", url, storage_options)

    def reopen():
        return fs.open(path, "rb")

    with storage_errors("data.source", url):
        return HashingReader(retrying(reopen, "data.source", url, retry_seconds), reopen, url, retry_seconds)


def total_bytes(urls: list[str], storage_options: dict, retry_seconds: float = RETRY_SECONDS) -> int | None:
    """The size of all the sources, for prepare's progress (MB read of it, the time left); None where a store
    does not tell a file's size."""
    total = 0
    for url in urls:
        fs, path = url_to_fs("data.source", url, storage_options)
        with storage_errors("data.source", url):
            size = retrying(lambda: fs.size(path), "data.source", url, retry_seconds)
        if size is None:
            return None
        total += size
    return total


def check_sources(source: str | list[str]) -> list[str]:
    """data.source problems found without reading anything: local files and globs that are not there (object-store
    URLs are reached before any work starts, medgen/preflight.py)."""
    p = []
    for url in [source] if isinstance(source, str) else source:
        if not is_local(url):
            continue
        path = local_path(url)
        if is_glob(path):
            if not any(os.path.isfile(f) for f in glob.glob(path)):
                p.append(f"data.source: no file matches {url}")
        elif not os.path.isfile(path):
            p.append(f"data.source: file not found: {url}")
    return p


def source_urls(source: str | list[str], storage_options: dict, retry_seconds: float = RETRY_SECONDS) -> list[str]:
    """data.source as the files to read, in order: a list in its order, each glob's matches sorted by name."""
    urls: list[str] = []
    for entry in [source] if isinstance(source, str) else source:
        urls += _expand(entry, storage_options, retry_seconds) if is_glob(entry) else [entry]
    if not urls:
        raise UserError("data.source: an empty list; name at least one CSV file")
    return urls


def _expand(pattern: str, storage_options: dict, retry_seconds: float) -> list[str]:
    if "://" not in pattern:  # a local pattern gives paths as written (relative stays relative)
        found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    else:
        fs, path = url_to_fs("data.source", pattern, storage_options)
        with storage_errors("data.source", pattern):
            found = [fs.unstrip_protocol(p) for p in sorted(retrying(lambda: fs.glob(path), "data.source", pattern,
                                                                         retry_seconds))]
    if not found:
        raise UserError(f"data.source {redact(pattern)}: no file matches this pattern")
    return found


MAX_FIELD_CHARS = 64 << 20  # a longer field is an unmatched quote swallowing the file, not an article


@dataclass
class Batch:
    """Up to ``chunk_rows`` data rows: the well-formed ones as records, the others counted by reason."""

    records: list[dict[str, str]] = field(default_factory=list)
    malformed: Counter = field(default_factory=Counter)

    @property
    def rows(self) -> int:
        return len(self.records) + sum(self.malformed.values())


def iter_batches(reader: HashingReader, cols: Columns, chunk_rows: int, url: str) -> Iterator[Batch]:
    """Stream the CSV in batches; memory holds one batch whatever the file size.

    A row with another number of fields than the header (``wrong_field_count``) or with text after a
    closing quote (``malformed_quoting``) is counted, never parsed into shifted columns. A quoted field
    still open at the end of the file is a broken source (UserError): it swallowed every later row.
    """
    csv.field_size_limit(MAX_FIELD_CHARS)
    buffered = io.BufferedReader(reader, 1 << 20)
    _check_encoding(buffered.peek(4)[:4], url)
    text = io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="replace", newline="")
    state = {"eof": False}
    rows = csv.reader(_lines(text, state, url), strict=True)
    header = _header(rows, cols, url)
    if header is None:
        log.warning("data.source %s is empty: no header, no rows", redact(url))
        return
    batch = Batch()
    while True:
        start = rows.line_num + 1
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            if state["eof"] or "field larger" in str(e):
                raise UserError(
                    f"data.source {redact(url)}: the quoted field opened at line {start} never closes (an unmatched "
                    f"'\"' swallows every later row); fix the quoting in the file"
                ) from None
            batch.malformed["malformed_quoting"] += 1
        else:
            if not row:
                continue  # a blank line is not a row
            if len(row) == len(header):
                batch.records.append(dict(zip(header, row)))
            else:
                batch.malformed["wrong_field_count"] += 1
        if batch.rows >= chunk_rows:
            yield batch
            batch = Batch()
    if batch.rows:
        yield batch


def _lines(text: io.TextIOWrapper, state: dict, url: str) -> Iterator[str]:
    try:
        yield from text
    except OSError as e:
        raise UserError(f"data.source {redact(url)}: reading failed: {first_line(e)}") from None
    state["eof"] = True


# byte order marks of the encodings a spreadsheet may save as "Unicode" (UTF-32 first: it starts like UTF-16)
OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
              (b"\xfe\xff", "UTF-16"))


def _check_encoding(head: bytes, url: str) -> None:
    """A UTF-16/32 file decoded as UTF-8 is all replacement characters and NULs: say what it is instead."""
    for bom, name in OTHER_BOMS:
        if head.startswith(bom):
            raise UserError(f"data.source {redact(url)}: the file is {name} (it starts with a {name} byte order "
                            f"mark); medgen reads UTF-8: save it as UTF-8")


def _header(rows, cols: Columns, url: str) -> list[str] | None:
    try:
        header = next(rows, None)
    except csv.Error as e:
        raise UserError(f"data.source {redact(url)}: the header line is not valid CSV ({e}); "
                        f"the first line must name the columns") from None
    if header is None:
        return None
    wanted = [c for c in (cols.title, cols.text, cols.url, cols.tags, cols.authors, cols.timestamp) if c]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise UserError(
            f"data.source {redact(url)}: no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(map(_shown, header))[:300]}); set data.<name>_column, or '' if there is none"
        )
    twice = [c for c in dict.fromkeys(wanted) if header.count(c) > 1]
    if twice:
        raise UserError(f"data.source {redact(url)}: column {', '.join(map(repr, twice))} appears more than once "
                        f"in the header (columns: {', '.join(map(_shown, header))[:300]}); rename the copies")
    return header


def _shown(name: str) -> str:
    """A column name for a one-line message: as it is, or escaped where it holds control characters."""
    return name if name.isprintable() else ascii(name)


def parse_list(value: str) -> list[str] | None:
    """``"['a', 'b']"`` -> ['a', 'b']; '' -> []; None when the string is not a list literal."""
    value = value.strip()
    if not value:
        return []
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(parsed, (list, tuple)):
        return None
    return [str(x) for x in parsed]


MAX_TIMESTAMP_CHARS = 100


def parse_timestamp(value: str) -> str | None:
    """Mixed ISO-8601 -> normalised UTC ISO string; '' stays ''; None when unparsable."""
    if not value.strip():
        return ""
    if len(value) > MAX_TIMESTAMP_CHARS:  # pandas' parser is quadratic in the length (100k chars: 0.6 s)
        return None
    import pandas as pd  # here, not at the top: validating a config reads this module and needs no pandas

    try:
        ts = pd.Timestamp(value.strip())
    except (ValueError, TypeError, OverflowError):
        return None
    if ts is pd.NaT:
        return None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.isoformat()
