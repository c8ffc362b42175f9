"""SLURM entry point of the prepare stage (one task): CSV -> cleaned, split, tokenized Parquet shards.
Requeued, it starts over."""
from medgen.launch.slurm import StageJob


class Prepare(StageJob):
    stage = "prepare"
