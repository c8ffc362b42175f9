"""Read the articles CSV from any fsspec URL, in chunks, hashing the raw bytes as they stream by."""
from __future__ import annotations

import ast
import hashlib
import io
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pandas as pd

from medgen.errors import UserError


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
    """A read-only byte stream that hashes and counts what passes through it."""

    def __init__(self, raw):
        self.raw, self.sha256, self.bytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha256.update(data)
        self.bytes += n
        return n


def redact(url: str) -> str:
    """A URL safe to log: no user:password@ part, no query string (presigned credentials)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    host = host.rpartition("@")[2]
    return f"{scheme}://{host}{slash}{path.split('?')[0]}"


def open_source(url: str, storage_options: dict) -> HashingReader:
    try:
        f = fsspec.open(url, "rb", **storage_options).open()
    except FileNotFoundError:
        raise UserError(f"data.source: not found: {redact(url)}") from None
    except PermissionError as e:
        raise UserError(f"data.source: access denied to {redact(url)} ({e}); check the credentials in the environment") from None
    except (ValueError, ImportError) as e:
        raise UserError(f"data.source: cannot open {redact(url)}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise UserError(f"data.source: cannot read {redact(url)}: {str(e).splitlines()[0]}") from None
    return HashingReader(f)


def iter_chunks(reader: HashingReader, cols: Columns, chunk_rows: int, url: str) -> Iterator[pd.DataFrame]:
    """DataFrames of at most ``chunk_rows`` rows, all columns as strings ('' for missing)."""
    text = io.TextIOWrapper(io.BufferedReader(reader, 1 << 20), encoding="utf-8", errors="replace", newline="")
    try:
        chunks = pd.read_csv(
            text, chunksize=chunk_rows, dtype=str, keep_default_na=False, na_filter=False, engine="c",
        )
        first = True
        for chunk in chunks:
            if first:
                missing = [c for c in (cols.title, cols.text, cols.url, cols.tags, cols.authors, cols.timestamp)
                           if c and c not in chunk.columns]
                if missing:
                    raise UserError(
                        f"data.source {redact(url)}: no column {', '.join(map(repr, missing))} "
                        f"(columns: {', '.join(chunk.columns)}); set data.<name>_column, or '' if there is none"
                    )
                first = False
            yield chunk
    except pd.errors.EmptyDataError:
        return  # an empty file: zero rows read, reported as such
    except pd.errors.ParserError as e:
        raise UserError(f"data.source {redact(url)}: not a readable CSV ({str(e).splitlines()[0]})") from None


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


def parse_timestamp(value: str) -> str | None:
    """Mixed ISO-8601 -> normalised UTC ISO string; '' stays ''; None when unparsable."""
    if not value.strip():
        return ""
    try:
        ts = pd.Timestamp(value.strip())
    except (ValueError, TypeError, OverflowError):
        return None
    if ts is pd.NaT:
        return None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.isoformat()
