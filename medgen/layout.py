"""Where everything of a run lives in ``<run.dir>`` (``RunLayout``), and of a sweep in its directory
(``SweepLayout``): the objects every stage, the report, the comparison and the launchers use, so no module
spells another's paths. Also here: the one "stage finished" test (``RunLayout.finished``) and where each stage
records the config it ran with (``RunLayout.record``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECORD = "medgen_config.json"  # the resolved config a stage ran with, beside its outputs (medgen/provenance.py)


@dataclass(frozen=True)
class RunLayout:
    root: Path

    # a stage has finished when its last output is in place: each stage publishes it last, atomically
    def marker(self, stage: str) -> Path:
        return {"train": self.adapter / "adapter_config.json", "evaluate": self.metrics,
                "generate": self.generations_file, "report": self.report_file}[stage]

    def finished(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def record(self, stage: str) -> Path:
        """The resolved config (and its fingerprint) ``stage`` ran with, in the folder of its outputs."""
        return {"train": self.adapter, "evaluate": self.eval, "generate": self.generations,
                "report": self.report}[stage] / RECORD

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

    @property
    def tracking(self) -> Path:
        """The ids of this run's MLflow / W&B runs, which every stage, resume and requeue reopens (medgen/tracking.py)."""
        return self.root / "tracking.json"

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

    @property
    def batch_output_file(self) -> Path:
        """OpenAI batch output lines, one per custom_id (generate.format=openai-batch)."""
        return self.generations / "batch_output.jsonl"

    @property
    def base_generations_file(self) -> Path:
        """The base model's completions of the first generate.base_prompts prompts, for the report's comparison."""
        return self.generations / "base.jsonl"

    # report
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_file(self) -> Path:
        return self.report / "report.md"

    @property
    def report_html(self) -> Path:
        return self.report / "report.html"

    # launchers
    @property
    def ranks(self) -> Path:
        return self.root / "ranks"

    def heartbeat(self, stage: str, rank: int) -> Path:
        """A rank's heartbeat while a stage runs (medgen/watchdog.py)."""
        return self.ranks / f"heartbeat-{stage}-rank-{rank:05d}.json"

    @property
    def hang(self) -> Path:
        """Hang reports and the stacks of the ranks that answered (medgen/watchdog.py)."""
        return self.root / "hang"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def jobs_file(self) -> Path:
        return self.slurm / "jobs.json"


@dataclass(frozen=True)
class SweepLayout:
    """A sweep directory: the points' run directories, the sweep's own records and its comparison report."""

    root: Path

    def point(self, name: str) -> RunLayout:
        return RunLayout(self.root / name)

    @property
    def manifest(self) -> Path:
        """sweep.json: the grid, the shards and every point (medgen/sweep.py)."""
        return self.root / "sweep.json"

    @property
    def local_status(self) -> Path:
        """A local sweep's outcome per point and stage."""
        return self.root / "local.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def comparison(self) -> Path:
        return self.report / "compare.md"

    @property
    def comparison_html(self) -> Path:
        return self.report / "compare.html"

    @property
    def comparison_json(self) -> Path:
        return self.report / "compare.json"

    @property
    def jobs_file(self) -> Path:
        return RunLayout(self.root).jobs_file

    @property
    def tracking(self) -> Path:
        """The sweep's MLflow parent run (medgen/tracking.py)."""
        return self.root / "tracking.json"
