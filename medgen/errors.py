"""User-facing errors and "try again" stops: the CLI prints each as one line (no traceback) and exits 2, or 75
for the ones a rerun gets past (preemption, an object store that stayed away)."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: the message names the culprit and the remedy."""


class ConfigError(UserError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


EXIT_TRY_AGAIN = 75  # EX_TEMPFAIL: the launcher (SLURM) requeues, the rerun resumes


class Preempted(Exception):
    """Training stopped on a signal after a complete checkpoint; rerunning resumes from it (exit 75)."""


class StorageUnavailable(UserError):
    """The object store stayed unreachable for the whole retry window: rerun once it is back (exit 75)."""
