"""User-facing errors: the CLI prints them as one line each (no traceback) and exits 2."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: the message names the culprit and the remedy."""


class ConfigError(UserError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


EXIT_TRY_AGAIN = 75  # EX_TEMPFAIL: the launcher (SLURM) requeues, the rerun resumes


class StorageUnavailable(UserError):
    """The object store stayed unreachable for the whole retry window: rerun once it is back (exit 75)."""
