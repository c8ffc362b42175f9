"""Read prepared shards back: a resumable packed stream (train) and whole articles (evaluate).

Training data is cut into ``num_streams`` streams that do not depend on the number of processes:
stream ``v`` reads shards ``v, v + V, v + 2V, ...`` over and over (one pass = one epoch of that stream)
and packs their documents into fixed blocks. Process ``p`` of ``W`` serves streams ``v % W == p``,
round-robin, so the global batch of a step holds the same blocks for 1, 2 or 4 processes as long as
``num_streams`` and the global batch are the same. Each stream's position (epoch, shard, row, the
tokens left over from the last block) is a small dict: ``state_dict()`` / ``load_state_dict()``
restore it exactly, per stream, whatever the number of processes on resume.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from medgen.data.retry import RETRY_SECONDS
from medgen.data.shards import ShardRef, open_shard, shard_refs


def iter_shard(shard: ShardRef, storage_options: dict, columns: list[str], start: int = 0,
               retry_seconds: float = RETRY_SECONDS) -> Iterator[dict[str, Any]]:
    """Rows of one shard from row ``start`` on, row group by row group; the whole shard is checked
    against the manifest (``open_shard``) before its first row."""
    pf = open_shard(shard, storage_options, retry_seconds)
    first = 0
    for i in range(pf.num_row_groups):
        n = pf.metadata.row_group(i).num_rows
        if first + n > start:
            rows = pf.read_row_group(i, columns=columns).to_pylist()
            yield from rows[max(0, start - first):]
        first += n


def load_articles(url: str, manifest: dict, storage_options: dict, split: str,
                  columns: tuple[str, ...] = ("id", "tags", "input_ids", "n_bytes"),
                  retry_seconds: float = RETRY_SECONDS) -> list[dict[str, Any]]:
    """All articles of a split in manifest order (shard by shard, row by row)."""
    rows: list[dict[str, Any]] = []
    for shard in shard_refs(url, manifest, split):
        rows.extend(iter_shard(shard, storage_options, list(columns), retry_seconds=retry_seconds))
    return rows


@dataclass
class _Piece:
    """Tokens of one document segment waiting in the packing buffer, and where they came from."""

    article: str
    offset: int  # offset of tokens[0] inside the document's segment
    tokens: list[int]


@dataclass
class StreamState:
    epoch: int = 0
    shard: int = 0  # index into this stream's shard list
    row: int = 0  # next row to read in that shard
    pieces: list[dict] = field(default_factory=list)  # read but not yet yielded


class Stream:
    """One stream: shards v, v+V, ... packed into blocks of ``block`` tokens, cycling over epochs.

    ``mode='wrapped'``: segments ``doc sep`` joined and cut anywhere; attention crosses documents.
    ``mode='documents'``: segments ``sep doc sep``; every piece of a segment in a block restarts its
    position ids at 0 and its first token carries no loss (padding-free packing: attention stays inside
    a piece, exact with ``use_cache=False``).
    """

    def __init__(self, shards: list[ShardRef], storage_options: dict, block: int, sep: int, mode: str,
                 retry_seconds: float = RETRY_SECONDS):
        self.shards, self.storage_options, self.retry_seconds = shards, storage_options, retry_seconds
        self.block, self.sep, self.mode = block, sep, mode
        self.state = StreamState()

    def _segment(self, ids: list[int]) -> list[int]:
        return ids + [self.sep] if self.mode == "wrapped" else [self.sep] + ids + [self.sep]

    def _rows(self) -> Iterator[dict[str, Any]]:
        """Rows from the saved position on, forever; the state advances as rows are taken."""
        rows_this_pass = self.state.row
        while True:
            st = self.state
            for row in iter_shard(self.shards[st.shard], self.storage_options, ["id", "input_ids"], st.row,
                                  self.retry_seconds):
                st.row += 1
                rows_this_pass += 1
                yield row
            st.shard, st.row = st.shard + 1, 0
            if st.shard == len(self.shards):
                if not rows_this_pass:
                    raise ValueError(f"no training rows in shards {[s.url for s in self.shards]}")
                st.shard, st.epoch, rows_this_pass = 0, st.epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pieces = [_Piece(**p) for p in self.state.pieces]
        rows = self._rows()
        while True:
            while sum(len(p.tokens) for p in pieces) < self.block:
                row = next(rows)
                pieces.append(_Piece(row["id"], 0, self._segment(row["input_ids"])))
            item, pieces = self._cut(pieces)
            self.state.pieces = [vars(p).copy() for p in pieces]
            yield item

    def _cut(self, pieces: list[_Piece]) -> tuple[dict[str, Any], list[_Piece]]:
        ids: list[int] = []
        pos: list[int] = []
        rest: list[_Piece] = []
        for i, p in enumerate(pieces):
            take = p.tokens[: self.block - len(ids)]
            ids += take
            pos += range(len(take))
            if len(take) < len(p.tokens):
                rest = [_Piece(p.article, p.offset + len(take), p.tokens[len(take):])] + pieces[i + 1:]
                break
        item: dict[str, Any] = {"input_ids": ids, "sample": f"{pieces[0].article}@{pieces[0].offset}"}
        if self.mode == "documents":
            item["position_ids"] = pos
        return item, rest


class PackedStream(torch.utils.data.IterableDataset):
    """The blocks this process trains on: its streams (v % world == rank), interleaved round-robin."""

    def __init__(self, url: str, manifest: dict, storage_options: dict, block: int, sep: int, mode: str,
                 num_streams: int, rank: int, world: int, split: str = "train", retry_seconds: float = RETRY_SECONDS):
        if num_streams % world:
            raise ValueError(f"num_streams={num_streams} is not a multiple of the number of processes ({world})")
        shards = shard_refs(url, manifest, split)
        if len(shards) < num_streams:
            raise ValueError(f"{len(shards)} {split} shards cannot feed {num_streams} streams: "
                             f"prepare with data.num_shards >= {num_streams}")
        self.stream_ids = list(range(rank, num_streams, world))
        self.streams = {v: Stream(shards[v::num_streams], storage_options, block, sep, mode, retry_seconds) for v in self.stream_ids}
        self.num_streams, self.next = num_streams, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iters = {v: iter(s) for v, s in self.streams.items()}
        while True:
            v = self.stream_ids[self.next]
            item = next(iters[v])
            self.next = (self.next + 1) % len(self.stream_ids)
            yield item

    def state_dict(self) -> dict[str, Any]:
        """Positions after the last block yielded, keyed by stream id."""
        return {"num_streams": self.num_streams, "next": self.next,
                "streams": {str(v): copy.deepcopy(vars(s.state)) for v, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_streams"] != self.num_streams:
            raise ValueError(f"checkpoint has {state['num_streams']} data streams, this run {self.num_streams}")
        for v, s in self.streams.items():
            s.state = StreamState(**copy.deepcopy(state["streams"][str(v)]))
        self.next = state["next"] % len(self.stream_ids)


def as_hf_iterable(stream: PackedStream):
    """A ``datasets.IterableDataset`` view of the stream, for APIs that insist on one (TRL's type check).

    medgen's trainer iterates the ``PackedStream`` itself (exact state, no second split by accelerate);
    the view reads a copy, so peeking at it (TRL does) never moves the training position.
    """
    import datasets

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    return datasets.IterableDataset.from_generator(
        lambda: ({"input_ids": it["input_ids"]} for it in copy.deepcopy(stream)), features=features)


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Blocks -> model inputs. Every block is full, so there is never padding to mask."""
    ids = torch.tensor([it["input_ids"] for it in items], dtype=torch.long)
    labels = ids.clone()
    batch = {"input_ids": ids, "labels": labels}
    if "position_ids" in items[0]:
        pos = torch.tensor([it["position_ids"] for it in items], dtype=torch.long)
        batch["position_ids"] = pos
        labels[pos == 0] = -100  # a piece's first token has no context inside its piece
    else:
        batch["attention_mask"] = torch.ones_like(ids)
    return batch
