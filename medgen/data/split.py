"""Deterministic, order-free assignment of articles to ids, splits and shards."""
from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")


def article_id(url: str, title: str, text: str) -> str:
    """Stable id: hash of the normalised URL, or of title+text when there is no URL."""
    url = url.strip()
    if url:
        key = "url:" + url.split("?")[0].split("#")[0].rstrip("/").lower()
    else:
        key = "content:" + title.strip() + "\n" + text.strip()
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]


def _unit(article: str, salt: str) -> float:
    h = hashlib.sha256(f"{salt}:{article}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_split(article: str, val_fraction: float, test_fraction: float) -> str:
    """The same article gets the same split on every machine, whatever the input order or shard count."""
    u = _unit(article, "split")
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def assign_shard(article: str, num_shards: int) -> int:
    return int(_unit(article, "shard") * num_shards)
