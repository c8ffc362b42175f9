"""SLURM entry point of a sweep's comparison report (one task), after every point's jobs ended, whether they
succeeded or not. Requeued, it starts over."""
from medgen.launch.slurm import StageJob


class Compare(StageJob):
    stage = "compare"
