"""SLURM entry point of the train stage: one SLURM task per GPU (per CPU rank with gloo), one node or
several. On USR2 (preemption or time limit) every rank checkpoints at the next step boundary, rank 0
requeues the job, and the rerun resumes from the checkpoint."""
from medgen.launch.slurm import StageJob


class Train(StageJob):
    stage = "train"
