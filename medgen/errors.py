"""User-facing errors and "try again" stops: the CLI prints each as one line (no traceback) and exits 2, or
``TryAgain.exit_code`` (75) for the ones a rerun gets past (preemption, an object store that stayed away).

The CLI and the SLURM task both catch ``TryAgain``: the CLI exits 75, the SLURM task requeues its job.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: the message names the culprit and the remedy."""


class ConfigError(UserError):
    """Every problem found in a config, reported together."""

    label = "config error"  # each problem is printed as "medgen: <label>: <problem>"

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


EXIT_TRY_AGAIN = 75  # EX_TEMPFAIL: the launcher (SLURM) requeues, the rerun resumes


class TryAgain(Exception):
    """A stop that a rerun of the same command gets past, resuming from what is on disk (exit 75)."""

    exit_code = EXIT_TRY_AGAIN
    prefix = "medgen: error: "  # how the CLI starts its one line


class Preempted(TryAgain):
    """Training stopped on a signal after a complete checkpoint; rerunning resumes from it."""

    prefix = "medgen: "  # not an error: the stop that was asked for


class StorageUnavailable(TryAgain, UserError):
    """The object store stayed unreachable for the whole retry window: rerun once it is back.

    Also a UserError, so the places that pass user errors through untouched (disk-full and storage
    mapping) pass this one through as well."""


class InputError(ConfigError):
    """Every input or output of a command that cannot be used (medgen/preflight.py), reported together."""

    label = "error"


class DistributedError(UserError):
    """The processes of a launch do not form the group they were launched as (medgen/dist.py)."""
