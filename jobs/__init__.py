"""submitit entry points, one per stage (see medgen/launch/slurm.py); SLURM tasks import them from the checkout."""
