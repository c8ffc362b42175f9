"""The shape of a training run, fixed at its first start: the data streams (the sample order) and the global
batch (sequences per optimizer step, all processes together). Every checkpoint records it; a resume on
another number of processes keeps both and derives what each process does (its batch and its gradient
accumulation), so the run goes on as if nothing had changed (tests/test_train.py: 2 -> 1 and 1 -> 2 processes
end within 1e-5 of the uninterrupted run).

What cannot be kept is refused in one line: a number of processes that does not divide the streams (each
process reads whole streams), or the global batch. LoRA dropout (``lora.dropout`` > 0) draws its masks per
process, so with it a resumed run on another world size trains on the same data but not the same masks.

Default streams: as many as the training split has shards, rounded down to a multiple of the processes at
the first start (at most 64: each stream keeps one shard reader open): with ``data.num_shards`` = 2 a run
started on 1 or 2 processes resumes on 1 or 2; prepare more shards for more freedom.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from medgen.config import Config, TrainConfig
from medgen.errors import UserError

MAX_DEFAULT_STREAMS = 64


@dataclass(frozen=True)
class Shape:
    streams: int
    global_batch: int  # sequences per optimizer step, all processes
    batch_size: int  # per process and micro-batch
    grad_accum: int
    world_size: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def default_streams(world: int, train_shards: int) -> int:
    """The most streams the shards feed, a multiple of ``world`` (never fewer than ``world``: PackedStream then
    says which shards are missing)."""
    n = min(train_shards, max(MAX_DEFAULT_STREAMS, world))
    return max(world, n - n % world)


def first_start(t: TrainConfig, world: int, train_shards: int) -> Shape:
    streams = t.data_streams or default_streams(world, train_shards)
    return Shape(streams, t.batch_size * t.grad_accum * world, t.batch_size, t.grad_accum, world)


def resumed(t: TrainConfig, world: int, recorded: dict[str, Any], ckpt: str) -> Shape:
    """The recorded shape on ``world`` processes: the same streams and global batch; the configured per-process
    batch when it divides the per-process share, else the largest batch below it that does."""
    streams, global_batch = recorded["streams"], recorded["global_batch"]
    if t.data_streams and t.data_streams != streams:  # stream_state says it too; here before any model loads
        raise UserError(f"train.data_streams: checkpoint {ckpt} was trained with {streams} data streams, this run "
                        f"has {t.data_streams}; set train.data_streams={streams} (or 0) to resume it, or use another "
                        "run.dir to start over")
    if streams % world:
        fits = [n for n in range(1, streams + 1) if streams % n == 0]
        raise UserError(f"train: checkpoint {ckpt} reads {streams} data streams, which {world} processes cannot "
                        f"share (each reads whole streams): resume it on {', '.join(map(str, fits))} processes, or "
                        "start a new run.dir (train.data_streams fixes the streams at a run's first start)")
    if global_batch % world:
        raise UserError(f"train: checkpoint {ckpt} trains {global_batch} sequences per step, which {world} "
                        f"processes cannot share evenly; resume it on a number of processes that divides "
                        f"{global_batch}")
    share = global_batch // world
    batch = max(b for b in range(1, min(t.batch_size, share) + 1) if share % b == 0)
    return Shape(streams, global_batch, batch, share // batch, world)


def legacy(t: TrainConfig, world: int, streams: int) -> Shape:
    """A checkpoint written before shapes were recorded: its streams, the configured batch."""
    return Shape(streams, t.batch_size * t.grad_accum * world, t.batch_size, t.grad_accum, world)


def applied(cfg: Config, shape: Shape) -> Config:
    """``cfg`` with the shape's per-process batch, accumulation and streams (what train builds from, and what
    its record says)."""
    train = dataclasses.replace(cfg.train, batch_size=shape.batch_size, grad_accum=shape.grad_accum,
                                data_streams=shape.streams)
    return dataclasses.replace(cfg, train=train)


def describe_change(before: dict[str, Any], now: Shape) -> str | None:
    """The one log line for a resume on another number of processes (None: nothing changed)."""
    if before["world_size"] == now.world_size and before["batch_size"] == now.batch_size \
            and before["grad_accum"] == now.grad_accum:
        return None
    return (f"train: resuming a run checkpointed on {_processes(before['world_size'])} on {now.world_size}: "
            f"{now.streams} data streams and {now.global_batch} sequences per step kept, each process now "
            f"trains batch {now.batch_size} x {now.grad_accum} accumulation steps "
            f"(was {before['batch_size']} x {before['grad_accum']})")


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"
