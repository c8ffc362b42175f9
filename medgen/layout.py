"""Where everything of a run lives in ``<run.dir>``: one object every stage and the report use, so no stage
spells another stage's paths."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    # train
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def samples_of(self, rank: int) -> Path:
        return self.samples / f"rank-{rank:05d}.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    # evaluate
    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval / "metrics.json"

    @property
    def eval_articles(self) -> Path:
        return self.eval / "articles.jsonl"

    # generate
    @property
    def generations(self) -> Path:
        return self.root / "generations"

    @property
    def generations_file(self) -> Path:
        return self.generations / "generations.jsonl"

    # report
    @property
    def report(self) -> Path:
        return self.root / "report"

    # launchers
    @property
    def ranks(self) -> Path:
        return self.root / "ranks"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def jobs_file(self) -> Path:
        return self.slurm / "jobs.json"
