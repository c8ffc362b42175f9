"""The checkpoint protocol of training: what makes a checkpoint complete, and how a run resumes from one.

The Trainer writes ``checkpoint-N`` (adapter, optimizer, scheduler, every rank's RNG state); every rank
adds its data streams' positions; rank 0 then writes ``medgen.json`` and renames the folder ``step-N``.
That rename is the commit point: only ``step-N`` folders are ever resumed from, so a checkpoint cut short
(a kill, a full disk) is never used. The newest ``keep`` complete ones are kept, and the best one by
validation loss (its step is in the newest one's ``medgen.json``) whatever its age.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from medgen import atomic
from medgen.errors import UserError

COMMITTED = "medgen.json"


class Checkpoints:
    """The checkpoints of one run, in ``directory`` (the Trainer's output_dir)."""

    def __init__(self, directory: Path, keep: int):
        self.directory, self.keep = Path(directory), keep

    @staticmethod
    def step(ckpt: Path) -> int:
        return int(ckpt.name.split("-")[1])

    def complete(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.directory.exists():
            return []
        return sorted((p for p in self.directory.glob("step-*") if (p / COMMITTED).exists()), key=self.step)

    def newest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def partial(self, step: int) -> Path:
        """Where the Trainer writes the checkpoint of ``step`` before it is committed."""
        return self.directory / f"checkpoint-{step}"

    def remove_partial(self) -> None:
        """Checkpoints never committed (a killed save): never resumed from, so never kept."""
        for p in self.directory.glob("checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)

    def add_stream_state(self, step: int, rank: int, state: dict[str, Any]) -> None:
        (self.partial(step) / f"stream-rank-{rank:05d}.json").write_text(json.dumps(state))

    def commit(self, step: int, world_size: int, **records: dict[str, Any] | None) -> Path:
        """Rank 0, once every rank has written its part: mark the checkpoint complete with ``records`` (the run's
        ``shape``, medgen/elastic.py; the ``validation`` state, medgen/validate.py; the ``schedule``'s settings,
        medgen/schedule.py; the settings that fix what it holds, ``run``: ``same_run``), rename it ``step-N``
        (the commit point), drop the oldest complete ones beyond ``keep``, never the best step's."""
        ckpt, final = self.partial(step), self.directory / f"step-{step}"
        info = {"step": step, "world_size": world_size, **{k: v for k, v in records.items() if v}}
        (ckpt / COMMITTED).write_text(json.dumps(info))
        atomic.commit_dir(ckpt, final)
        best = (records.get("validation") or {}).get("best_step")
        for old in self.complete()[:-self.keep]:
            if self.step(old) != best:
                shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def info(ckpt: Path) -> dict[str, Any]:
        """What the commit recorded: step, world size and ``records``."""
        return json.loads((ckpt / COMMITTED).read_text())

    @staticmethod
    def same_run(recorded: dict[str, Any] | None, now: dict[str, Any], ckpt: Path) -> None:
        """Refuse, in one line, to resume ``ckpt`` with settings that change what it holds (``now``: the base
        model, the adapter's shape, the data and its blocks; a checkpoint from before they were recorded: None).
        The rest (rates, steps, batch, validation, ...) may change on a resume."""
        changed = [f"{k} {recorded[k]!r} -> {v!r}" for k, v in now.items() if k in (recorded or {}) and recorded[k] != v]
        if changed:
            raise UserError(
                f"train: {ckpt} was trained with other settings ({'; '.join(changed)}), which fix what the checkpoint "
                f"holds: set them back to resume it, or use another run.dir (or delete {ckpt.parent}) to start over")

    def at(self, step: int) -> Path | None:
        """The complete checkpoint of ``step``, if it is there."""
        return next((p for p in self.complete() if self.step(p) == step), None)

    @staticmethod
    def recorded_streams(ckpt: Path) -> int:
        """The number of data streams the checkpoint's stream states were written with (0: none there)."""
        states = sorted(ckpt.glob("stream-rank-*.json"))
        return json.loads(states[0].read_text())["num_streams"] if states else 0

    @staticmethod
    def stream_state(ckpt: Path, num_streams: int, stream_ids: list[int], world: int) -> dict[str, Any]:
        """The data streams' positions saved in ``ckpt``, merged for this rank (``stream_ids``) of ``world``:
        the same streams whatever the number of processes, so a run resumes exactly on another world size."""
        states = [json.loads(p.read_text()) for p in sorted(ckpt.glob("stream-rank-*.json"))]
        if not states:
            raise UserError(f"checkpoint {ckpt} has no stream state; delete it to start over")
        if states[0]["num_streams"] != num_streams:  # another data order: this checkpoint cannot go on
            raise UserError(
                f"train.data_streams: checkpoint {ckpt} was trained with {states[0]['num_streams']} data streams, "
                f"this run has {num_streams} (train.data_streams=0 means one per process); set "
                f"train.data_streams={states[0]['num_streams']} to resume it, or use another run.dir to start over")
        merged: dict[str, Any] = {"num_streams": num_streams, "next": 0, "streams": {}}
        for s in states:
            merged["streams"].update(s["streams"])
        if len(states) == world:  # same layout: keep this rank's round-robin position
            mine = next(s for s in states if set(s["streams"]) == {str(v) for v in stream_ids})
            merged["next"] = mine["next"]
        return merged
