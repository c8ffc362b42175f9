"""What the SLURM launchers record about a submission (``<run.dir>/slurm/jobs.json``) and the job logs, read
without SLURM or submitit: ``medgen status`` and a sweep's comparison report both use it."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from medgen.layout import RunLayout


def jobs_file(run_dir: str | Path) -> Path:
    return RunLayout(Path(run_dir)).jobs_file


def read_jobs(run_dir: str | Path) -> dict[str, Any] | None:
    """jobs.json of the last submission for this run.dir or sweep directory (None: never submitted)."""
    path = jobs_file(run_dir)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def sweep_jobs(sweep_dir: str | Path) -> dict[str, Any]:
    """A SLURM sweep's jobs.json ({} for a local sweep, or for a plain chain's jobs.json in that directory)."""
    info = read_jobs(sweep_dir) or {}
    return info if info.get("sweep") else {}


def failed_log(logs: list[str]) -> str:
    """The log of the task that failed: the first that holds a traceback, else task 0's."""
    for path in logs:
        try:
            if "Traceback" in Path(path).read_text(errors="replace"):
                return path
        except OSError:
            continue
    return logs[0]


def error_line(log_path: str) -> str:
    """The error a failed job's log ends with: the exception line of its last traceback, else its last ERROR
    line ('' when neither is there). SLURM's exit code alone does not say it: submitit's wrapper exits with
    its own code when the task it ran raised."""
    try:  # torch's launcher prefixes a rank's error output with "[rank0]: "
        lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in Path(log_path).read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        after = (line for line in lines[starts[-1] + 1:] if line and not line[0].isspace())
        found = next(after, "")
        if found:
            return found
    errors = [line for line in lines if re.search(r"\bERROR\b", line)]
    return errors[-1].strip() if errors else ""


def log_cell(path: str) -> str:
    """A log path for a status table, or why there is none (a stage cancelled before it started)."""
    return path if Path(path).exists() else "(no log: never started)"
