"""Parquet shards + manifest.json on any fsspec URL, published atomically.

Shards are written under ``<url>/_tmp-<id>/`` and moved into place only when every one is complete;
the old manifest is removed before the move and the new one written last (temp name, then rename),
so a reader that trusts only the manifest never sees missing or partial shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
import uuid
from typing import Any, NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from medgen import atomic
from medgen.data.retry import RETRY_SECONDS, retrying
from medgen.data.storage import redact, storage_error, storage_errors, url_to_fs
from medgen.data.split import SPLITS
from medgen.errors import UserError
from medgen.layout import RECORD  # the record of the config prepare ran with (medgen/provenance.py)

MANIFEST = "manifest.json"
REPORT = "prepare_report.json"
SCHEMA = pa.schema([
    ("id", pa.string()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("url", pa.string()),
    ("tags", pa.list_(pa.string())),
    ("authors", pa.list_(pa.string())),
    ("timestamp", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("n_tokens", pa.int32()),
    ("n_bytes", pa.int32()),
])


def filesystem(url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs("data.shards", url, storage_options)


class _HashingWriter:
    """File-like wrapper that hashes and counts bytes written (pyarrow writes through it)."""

    def __init__(self, f):
        self.f, self.sha256, self.size, self.closed = f, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        if not self.closed:
            self.f.close()
            self.closed = True


class ShardWriter:
    """One ParquetWriter per (split, shard), rows buffered into row groups.

    On an object store each shard is written to a local temporary file and uploaded whole by ``finish``,
    so an outage retries one idempotent upload (``data.retry_seconds``), never a half-streamed one."""

    ROW_GROUP = 128  # rows buffered per shard file; bounds prepare's memory and each row group a reader decodes

    def __init__(self, url: str, storage_options: dict, num_shards: int, retry_seconds: float = RETRY_SECONDS):
        self.fs, self.root = filesystem(url, storage_options)
        self.url, self.num_shards, self.retry_seconds = url, num_shards, retry_seconds
        self.local = atomic.is_local(self.fs)
        self.staging = None if self.local else tempfile.TemporaryDirectory(prefix="medgen-shards-")
        self.tmp = posixpath.join(self.root, f"_tmp-{uuid.uuid4().hex[:12]}")
        self.buffers: dict[tuple[str, int], list[dict]] = {}
        self.writers: dict[tuple[str, int], tuple[pq.ParquetWriter, _HashingWriter]] = {}
        self.stats: dict[tuple[str, int], dict[str, int]] = {}
        self._preflight()

    def _preflight(self) -> None:
        """Fail now, not after hours of work, when the destination cannot be written; never create a bucket
        (s3fs's makedirs would), so object stores get a probe write before any makedirs."""
        if self.local:
            self._store(lambda: self.fs.makedirs(self.tmp, exist_ok=True), retry=False)
        self._store(lambda: self.fs.pipe(posixpath.join(self.tmp, ".probe"), b""))

    def _store(self, fn, retry: bool = True):
        """``fn()``, a call that touches the destination: outages retried (medgen/data/retry.py), storage
        failures mapped to one line naming data.shards."""
        with storage_errors("data.shards", self.url, writing=True):
            return retrying(fn, "data.shards", self.url, self.retry_seconds) if retry else fn()

    def _open(self, key: tuple[str, int]) -> None:
        """A Parquet writer for the shard: into its final temp path (local) or a local staging file."""
        rel = self.relpath(*key, self.num_shards)
        if self.local:
            path = posixpath.join(self.tmp, rel)
            self._store(lambda: self.fs.makedirs(posixpath.dirname(path), exist_ok=True), retry=False)
            f = self._store(lambda: self.fs.open(path, "wb"), retry=False)
        else:
            f = self._store(lambda: open(posixpath.join(self.staging.name, rel.replace("/", "-")), "wb"), retry=False)
        hw = _HashingWriter(f)
        self.writers[key] = (pq.ParquetWriter(hw, SCHEMA, compression="zstd"), hw)

    def _upload(self, key: tuple[str, int]) -> None:
        rel = self.relpath(*key, self.num_shards)
        local = posixpath.join(self.staging.name, rel.replace("/", "-"))
        self._store(lambda: self.fs.put_file(local, posixpath.join(self.tmp, rel)))
        os.remove(local)

    @staticmethod
    def relpath(split: str, shard: int, num_shards: int) -> str:
        return f"{split}/part-{shard:05d}-of-{num_shards:05d}.parquet"

    def add(self, split: str, shard: int, row: dict) -> None:
        key = (split, shard)
        buf = self.buffers.setdefault(key, [])
        buf.append(row)
        st = self.stats.setdefault(key, {"rows": 0, "tokens": 0})
        st["rows"] += 1
        st["tokens"] += row["n_tokens"]
        if len(buf) >= self.ROW_GROUP:
            self._flush(key)

    def _flush(self, key: tuple[str, int]) -> None:
        rows = self.buffers.get(key)
        if not rows:
            return
        if key not in self.writers:
            self._open(key)
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        self._store(lambda: self.writers[key][0].write_table(table), retry=False)
        self.buffers[key] = []

    def finish(self) -> dict[str, Any]:
        """Close every shard (empty ones too, so each split has exactly num_shards files); return their entries."""
        for split in SPLITS:
            for shard in range(self.num_shards):
                key = (split, shard)
                if key not in self.writers and not self.buffers.get(key):
                    self.buffers[key] = []
                    self._open(key)
                self._flush(key)
        splits: dict[str, Any] = {s: {"articles": 0, "tokens": 0, "shards": []} for s in SPLITS}
        for (split, shard), (writer, hw) in sorted(self.writers.items()):
            self._store(writer.close, retry=False)
            self._store(hw.close, retry=False)
            if not self.local:
                self._upload((split, shard))
            st = self.stats.get((split, shard), {"rows": 0, "tokens": 0})
            splits[split]["shards"].append({
                "path": self.relpath(split, shard, self.num_shards), "rows": st["rows"], "tokens": st["tokens"],
                "bytes": hw.size, "sha256": hw.sha256.hexdigest(),
            })
            splits[split]["articles"] += st["rows"]
            splits[split]["tokens"] += st["tokens"]
        return splits

    def publish(self, manifest: dict[str, Any], report: dict[str, Any], record: dict[str, Any]) -> None:
        """Move the shards into place, then write the report, the record of the config prepare ran with and
        (last) the manifest."""
        fs, root = self.fs, self.root
        manifest_path = posixpath.join(root, MANIFEST)
        self._store(lambda: _rm_if_exists(fs, manifest_path))  # from here on no manifest points at shards being replaced
        for split in SPLITS:
            final_dir = posixpath.join(root, split)
            self._store(lambda: _rm_if_exists(fs, final_dir, recursive=True))
            for entry in manifest["splits"][split]["shards"]:
                src, dst = posixpath.join(self.tmp, entry["path"]), posixpath.join(root, entry["path"])
                if self.local:
                    self._store(lambda: (fs.makedirs(final_dir, exist_ok=True), fs.mv(src, dst)), retry=False)
                else:  # a copy can be repeated; the temp prefix is removed below
                    self._store(lambda: fs.copy(src, dst))
        self.abort()
        self._store(lambda: atomic.write_text(posixpath.join(root, REPORT), json.dumps(report, indent=2), fs))
        self._store(lambda: atomic.write_text(posixpath.join(root, RECORD), json.dumps(record, indent=2), fs))
        self._store(lambda: atomic.write_text(manifest_path, json.dumps(manifest, indent=2), fs))

    def abort(self) -> None:
        """Best effort: close and delete the temporary shards (a failure here must not hide the first one)."""
        for writer, hw in self.writers.values():
            try:
                writer.close()
                hw.close()
            except Exception:
                pass
        try:
            if self.staging:
                self.staging.cleanup()
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp, recursive=True)
        except Exception:
            pass


def _rm_if_exists(fs: fsspec.AbstractFileSystem, path: str, recursive: bool = False) -> None:
    fs.invalidate_cache(path)  # a listing cached before an outage must not hide or invent the path
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def read_manifest(url: str, storage_options: dict, retry_seconds: float = RETRY_SECONDS) -> dict[str, Any]:
    fs, root = filesystem(url, storage_options)
    path = posixpath.join(root, MANIFEST)
    try:
        return json.loads(retrying(lambda: fs.cat_file(path), "data.shards", url, retry_seconds))
    except FileNotFoundError:
        raise UserError(
            f"data.shards: no {MANIFEST} at {redact(url)}; run `medgen prepare` first (or point data.shards at a prepared dataset)"
        ) from None
    except Exception as e:
        raise storage_error(e, "data.shards", url) from None


class ShardRef(NamedTuple):
    """One shard as the manifest lists it: where it is, and its size and SHA-256 when it was written."""

    url: str
    bytes: int
    sha256: str


def shard_refs(url: str, manifest: dict[str, Any], split: str) -> list[ShardRef]:
    base = url.rstrip("/")
    refs = []
    for e in manifest["splits"][split]["shards"]:
        shard = f"{base}/{e['path']}"
        if not isinstance(e.get("bytes"), int) or not isinstance(e.get("sha256"), str):
            raise UserError(f"data.shards: {MANIFEST} at {redact(url)} gives no size and sha256 for {redact(shard)}, "
                            f"so it cannot be checked; re-run `medgen prepare`")
        refs.append(ShardRef(shard, e["bytes"], e["sha256"]))
    return refs


def open_shard(ref: ShardRef, storage_options: dict, retry_seconds: float = RETRY_SECONDS) -> pq.ParquetFile:
    """The shard's bytes, read once and checked against the manifest (size, then SHA-256), as a ParquetFile.

    The one place where training and evaluation read a shard: nothing of a shard is parsed, let alone
    handed to a model, before all of its bytes match what ``prepare`` wrote. A flipped byte, a truncated
    or extended file, or another valid shard copied over it is a one-line UserError (exit 2).
    The whole shard is held in memory while it is read (its compressed size); an outage retries the read.
    """
    fs, path = url_to_fs("data.shards", ref.url, storage_options)
    with storage_errors("data.shards", ref.url):
        data = retrying(lambda: fs.cat_file(path), "data.shards", ref.url, retry_seconds)
    digest = hashlib.sha256(data).hexdigest() if len(data) == ref.bytes else None
    if digest != ref.sha256:
        found = digest or hashlib.sha256(data).hexdigest()
        raise UserError(
            f"data.shards: shard {redact(ref.url)} does not match the manifest: expected {ref.bytes} bytes "
            f"sha256 {ref.sha256[:16]}..., found {len(data)} bytes sha256 {found[:16]}... "
            f"(re-run `medgen prepare`, or restore the file)")
    return pq.ParquetFile(pa.BufferReader(data))


def check_tokenizer(manifest: dict[str, Any], fingerprint: str, model_name: str, url: str) -> None:
    have = manifest["tokenizer"]["fingerprint"]
    if have != fingerprint:
        raise UserError(
            f"data.shards {redact(url)} were tokenized with {manifest['tokenizer']['name']} ({have}), "
            f"but model {model_name} uses another tokenizer ({fingerprint}); rerun `medgen prepare` for this model"
        )
