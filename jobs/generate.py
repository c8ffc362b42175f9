"""SLURM entry point of the generate stage: one SLURM task per GPU (per CPU rank), prompts split across
ranks. Requeued, it skips the prompts already completed."""
from medgen.launch.slurm import StageJob


class Generate(StageJob):
    stage = "generate"
