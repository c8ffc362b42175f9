"""Read prepared shards back: packed training blocks (streaming) and whole articles (evaluation)."""
from __future__ import annotations

from typing import Any, Iterator

import pyarrow.parquet as pq

from medgen.data.shards import filesystem, shard_urls


def iter_shard(url: str, storage_options: dict, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of one Parquet shard, streamed row group by row group."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=columns).to_pylist()


def pack_wrapped(docs: Iterator[list[int]], block: int, sep: int) -> Iterator[list[int]]:
    """Concatenate documents, each followed by ``sep``, and cut into full blocks of ``block`` tokens.

    The trailing partial block is dropped (no padding is ever trained on).
    """
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        buf.append(sep)
        while len(buf) >= block:
            yield buf[:block]
            del buf[:block]


def _blocks(shards: list[str], storage_options: dict, block: int, sep: int) -> Iterator[dict[str, Any]]:
    for url in shards:
        docs = (r["input_ids"] for r in iter_shard(url, storage_options, ["input_ids"]))
        for ids in pack_wrapped(docs, block, sep):
            yield {"input_ids": ids}


def train_stream(url: str, manifest: dict, storage_options: dict, block: int, sep: int, split: str = "train"):
    """An ``IterableDataset`` of packed blocks with one datasets-shard per Parquet shard.

    accelerate splits it across ranks by shard (``n_shards`` = file count), so every rank reads
    disjoint files; blocks never straddle two shards.
    """
    import datasets

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    return datasets.IterableDataset.from_generator(
        _blocks,
        gen_kwargs={"shards": shard_urls(url, manifest, split), "storage_options": storage_options,
                    "block": block, "sep": sep},
        features=features,
    )


def load_articles(url: str, manifest: dict, storage_options: dict, split: str,
                  columns: tuple[str, ...] = ("id", "tags", "input_ids", "n_bytes")) -> list[dict[str, Any]]:
    """All articles of a split in manifest order (shard by shard, row by row)."""
    rows: list[dict[str, Any]] = []
    for shard in shard_urls(url, manifest, split):
        rows.extend(iter_shard(shard, storage_options, list(columns)))
    return rows
