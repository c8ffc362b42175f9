"""SLURM entry point of the evaluate stage: one SLURM task per GPU (per CPU rank), articles split
across ranks. Requeued, it starts over."""
from medgen.launch.slurm import StageJob


class Evaluate(StageJob):
    stage = "evaluate"
