"""Heartbeats and a watchdog for the distributed stages (train, evaluate, generate): a rank that stops making
progress is found, explained, and the job handed back to be tried again.

Every rank marks its progress where its work advances (``progress(phase, step)``: a training step, a
checkpoint, a batch of evaluation windows or of completions; a few hundred nanoseconds, no I/O). A thread
per rank writes the rank's heartbeat every few seconds to ``<run.dir>/ranks/heartbeat-<stage>-rank-N.json``:
host, pid, phase, step, when it last progressed, when it last beat. A hang is no progress on *any* rank for
the phase's timeout (a rank that waits in a collective while another works is not hung): ``run.start_timeout``
until the first progress of the stage (model loading, the first, maybe compiled, step), ``run.hang_timeout``
after. Then every rank that can still answer

- writes its Python stacks (``faulthandler``, all threads) to ``<run.dir>/hang/<stage>-rank-N-stacks.txt``;
- the lowest of them writes ``<run.dir>/hang/<stage>.json``, the hang report: each rank's host, phase, step,
  seconds since its last progress and its last heartbeat (a rank whose heartbeat stopped is named as stopped:
  a frozen process, a dead node, a rank stuck in the kernel), and logs it;
- the stage ends with the "try again" exit (75): under SLURM the reporting rank requeues the job, which
  resumes from its last complete checkpoint; elsewhere (torchrun, accelerate launch, one process) the
  answering processes exit 75 (torchrun itself then exits 1, naming exit code 75 for its workers).

No loop: a hang at the same stage and step as the previous report (the resumed run got no further) fails
the stage with exit 1 and the report instead of requeueing forever.

Timeouts: ``run.hang_timeout`` (default 900 s) is longer than anything a healthy rank does between two
marks: the object-store retry window (``data.retry_seconds``, 300 s), a checkpoint write, one training step
of a large batch on a CPU (~100 s for SmolLM2-135M at 8 x 1024 on 2 cores); validation, evaluation and
generation mark every batch. ``run.start_timeout`` (default 1800 s) covers loading a model from a cold hub
cache and a first compiled step. The process group's timeout is set above both (``pg_timeout``), so no
collective gives up before the watchdog has spoken. The cost: one ``time.monotonic()`` per mark and a small
file every few seconds (bench/bench_watchdog.py).
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from medgen.atomic import write_text
from medgen.config import Config, RunConfig
from medgen.layout import RunLayout

log = logging.getLogger("medgen")

TRY_AGAIN = 75  # errors.TryAgain.exit_code: the job is requeued / the command is rerun, and resumes
FAILED = 1
_current: Watchdog | None = None


def progress(phase: str, step: int | None = None) -> None:
    """Mark that this rank's work advanced (no-op when no watchdog runs)."""
    if _current is not None:
        _current.mark(phase, step)


def pg_timeout(run: RunConfig) -> datetime.timedelta:
    """The process group's timeout (``run`` is the config's run section): longer than the watchdog's, so the
    watchdog always speaks first; the same 30 min as gloo's default plus that margin when it is off."""
    longest = max(run.hang_timeout, run.start_timeout) if run.hang_timeout else 1800.0
    return datetime.timedelta(seconds=longest + 120)


class Watchdog:
    def __init__(self, layout: RunLayout, stage: str, rank: int, world: int, hang_timeout: float,
                 start_timeout: float, on_hang: Callable[[dict[str, Any]], None] | None = None):
        self.layout, self.stage, self.rank, self.world = layout, stage, rank, world
        self.hang_timeout, self.start_timeout = hang_timeout, start_timeout
        # a stopped rank is one whose heartbeat is older than a few beats (its thread stopped with it)
        self.beat_every = max(0.2, min(5.0, hang_timeout / 8))
        self.on_hang = on_hang or _exit
        self.phase, self.step, self.started = "start", None, False
        self.last = time.monotonic()
        self.wall_offset = time.time() - self.last  # heartbeats carry wall time: ranks compare them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medgen-watchdog", daemon=True)
        self.host, self.pid = socket.gethostname(), os.getpid()

    # ------------------------------------------------------------------ the rank's side

    def mark(self, phase: str, step: int | None) -> None:
        self.phase, self.last, self.started = phase, time.monotonic(), True
        if step is not None:  # a phase without steps of its own (validation) keeps the training step
            self.step = step

    def start(self) -> Watchdog:
        global _current
        try:  # a heartbeat that cannot be written (a full disk) must not stop the stage: its own writes report it
            self.layout.ranks.mkdir(parents=True, exist_ok=True)
            self._beat()
        except OSError as e:
            log.warning("watchdog: cannot write the heartbeat of rank %d (%s); other ranks will not see it", self.rank, e)
        _current = self
        self._thread.start()
        return self

    def stop(self) -> None:
        global _current
        if _current is self:
            _current = None
        self._stop.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stop.wait(self.beat_every):
            try:
                self._beat()
                if self._hung():
                    self._act()
                    return
            except Exception as e:  # the watchdog must never take a healthy rank down
                log.debug("watchdog: %s", e)

    def _beat(self) -> None:
        now = time.monotonic()
        rec = {"rank": self.rank, "world_size": self.world, "host": self.host, "pid": self.pid, "phase": self.phase,
               "step": self.step, "progress_time": round(self.wall_offset + self.last, 3),
               "beat_time": round(self.wall_offset + now, 3), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        write_text(str(self.layout.heartbeat(self.stage, self.rank)), json.dumps(rec) + "\n")

    def timeout(self) -> float:
        return self.hang_timeout if self.started else self.start_timeout

    def _hung(self) -> bool:
        """No progress here for the timeout, and none on any rank either."""
        limit = self.timeout()
        if time.monotonic() - self.last < limit:
            return False
        now = time.time()
        return all(now - b["progress_time"] >= limit for b in self.beats().values())

    def beats(self) -> dict[int, dict[str, Any]]:
        out = {}
        for r in range(self.world):
            try:
                out[r] = json.loads(self.layout.heartbeat(self.stage, r).read_text())
            except (OSError, ValueError):
                continue
        return out

    # ------------------------------------------------------------------ a hang

    def report(self) -> dict[str, Any]:
        now, stale = time.time(), 3 * self.beat_every + 5
        ranks, beats = [], self.beats()
        for r in range(self.world):
            b = beats.get(r)
            if b is None:
                ranks.append({"rank": r, "state": "never started (no heartbeat)"})
                continue
            since_beat = now - b["beat_time"]
            ranks.append({**{k: b[k] for k in ("rank", "host", "pid", "phase", "step")},
                          "since_progress_s": round(now - b["progress_time"], 1), "since_beat_s": round(since_beat, 1),
                          "state": "stopped responding" if since_beat > stale else "waiting"})
        answering = [x["rank"] for x in ranks if x["state"] == "waiting"]
        return {"stage": self.stage, "step": self.step, "phase": self.phase, "timeout_s": self.timeout(),
                "timeout_setting": "run.hang_timeout" if self.started else "run.start_timeout",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "world_size": self.world,
                "reporter": min(answering, default=self.rank), "ranks": ranks,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restarts": os.environ.get("SLURM_RESTART_COUNT")}

    def _act(self) -> None:
        hang = self.layout.hang
        hang.mkdir(parents=True, exist_ok=True)
        stacks = hang / f"{self.stage}-rank-{self.rank:05d}-stacks.txt"
        with open(stacks, "w") as f:
            f.write(f"rank {self.rank} on {self.host} (pid {self.pid}), phase {self.phase}, step {self.step}, "
                    f"no progress for {time.monotonic() - self.last:.0f} s\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        rep = self.report()
        if rep["reporter"] == self.rank:
            time.sleep(min(10.0, 2 * self.beat_every))  # the other answering ranks write their stacks meanwhile
            fresh = time.time() - 60
            rep["stacks"] = sorted(str(p) for p in hang.glob(f"{self.stage}-rank-*-stacks.txt")
                                   if p.stat().st_mtime >= fresh)
            previous = _read(hang / f"{self.stage}.json")
            again = bool(previous) and previous.get("step") == rep["step"] and previous.get("phase") == rep["phase"]
            rep["action"] = ("failed: the second hang in a row at the same step" if again
                             else "try again (exit 75): requeue under SLURM, rerun elsewhere")
            rep["previous"] = previous and {k: previous.get(k) for k in ("time", "step", "phase", "slurm_job_id")}
            write_text(str(hang / f"{self.stage}.json"), json.dumps(rep, indent=2) + "\n")
            log.error("%s", describe(rep))
            log.error("watchdog: the hang report is %s; Python stacks of the ranks that answered: %s",
                      hang / f"{self.stage}.json", ", ".join(rep["stacks"]))
            rep["code"] = FAILED if again else TRY_AGAIN
        else:
            log.error("watchdog: rank %d had no progress for %.0f s either; its stacks are in %s", self.rank,
                      time.monotonic() - self.last, stacks)
            rep["code"] = TRY_AGAIN
        self.on_hang(rep)


def describe(rep: dict[str, Any]) -> str:
    """The hang report in one log line."""
    parts = []
    for r in rep["ranks"]:
        if "host" not in r:
            parts.append(f"rank {r['rank']}: {r['state']}")
        else:
            parts.append(f"rank {r['rank']} on {r['host']} (pid {r['pid']}): {r['state']}, phase {r['phase']}, step "
                         f"{r['step']}, last progress {r['since_progress_s']:.0f} s ago, last heartbeat "
                         f"{r['since_beat_s']:.0f} s ago")
    return (f"watchdog: {rep['stage']} hung: no rank made progress for {rep['timeout_s']:.0f} s "
            f"({rep['timeout_setting']}); " + "; ".join(parts))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _exit(rep: dict[str, Any]) -> None:
    """End this process from the watchdog thread (the main thread may be stuck in a collective or a system
    call that no exception reaches). Under SLURM the reporting rank requeues the job first; the others wait
    for the requeue to end them (exiting first would let srun fail the step before the requeue)."""
    code = rep["code"]
    job = os.environ.get("SLURM_JOB_ID")
    if job and code == TRY_AGAIN:
        if rep["reporter"] == int(os.environ.get("RANK", "0")):
            log.error("watchdog: requeueing SLURM job %s; it resumes from the last complete checkpoint", job)
            out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            if out.returncode:
                log.error("watchdog: scontrol requeue %s failed: %s", job, out.stderr.strip())
        logging.shutdown()
        time.sleep(120)  # the requeue ends this task; if it never comes, exit with the try-again code
    else:
        log.error("watchdog: exiting with code %d%s", code, " (rerun to resume)" if code == TRY_AGAIN else "")
        logging.shutdown()
    os._exit(code)


WATCHED = ("train", "evaluate", "generate")


def start(cfg: Config, stage: str) -> Watchdog | None:
    """The watchdog of this rank for ``stage`` (None for a stage it does not watch, or run.hang_timeout=0)."""
    if stage not in WATCHED or cfg.run.hang_timeout <= 0:
        return None
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return Watchdog(cfg.layout, stage, rank, world, cfg.run.hang_timeout, cfg.run.start_timeout).start()
