"""Launchers: run the stages on this machine (local) or as a SLURM job chain (slurm)."""
