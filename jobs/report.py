"""SLURM entry point of the report stage (one task): markdown report and plots from the run directory.
Requeued, it starts over."""
from medgen.launch.slurm import StageJob


class Report(StageJob):
    stage = "report"
