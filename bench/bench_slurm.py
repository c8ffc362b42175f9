"""SLURM executor latency: seconds from `medgen run --executor slurm` to the first training step on the
local cluster (slurm/cluster.sh up), against the same pipeline with `--executor local` (the baseline).

    python bench/bench_slurm.py                 # 3 runs each, appended to bench/RESULTS.md
    python bench/bench_slurm.py --repeats 1 --no-write

The first training step is the first line of <run.dir>/samples/rank-00000.jsonl (written when step 1
ends); the run is stopped right after (scancel / kill). The SLURM breakdown comes from sacct (1 s
resolution): submit -> prepare starts -> prepare ends -> train starts -> first step. Goal: <= 60 s.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 60.0
CONFIG = ["--config", "configs/tiny.yaml"]


def _slurm_env() -> dict:
    env_sh = Path(os.environ.get("MEDGEN_INFRA", "/tmp/medgen-infra")) / "slurm" / "env.sh"
    conf = subprocess.run(["bash", "-c", f"source {env_sh} 2>/dev/null && echo $SLURM_CONF"], capture_output=True,
                          text=True).stdout.strip()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"SLURM_CONF": conf} if conf else {})}
    if subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode != 0:
        sys.exit("no SLURM cluster answers: run `slurm/cluster.sh up` (or `make services`) first")
    return env


def _wait_first_step(run: Path, deadline_s: float = 900) -> float:
    first, t_end = run / "samples" / "rank-00000.jsonl", time.time() + deadline_s
    while not (first.exists() and first.stat().st_size > 0):
        if time.time() > t_end:
            raise TimeoutError(f"no training step after {deadline_s} s ({run})")
        time.sleep(0.05)
    return time.time()


def _sacct_times(ids: list[str], env: dict) -> dict[str, tuple[float, float]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j", ",".join(ids)], env=env,
                         capture_output=True, text=True).stdout
    stamp = lambda s: dt.datetime.fromisoformat(s).timestamp() if s[:1].isdigit() else float("nan")  # noqa: E731
    return {j: (stamp(a), stamp(b)) for j, a, b in (ln.split("|") for ln in out.splitlines())}


def one_slurm(env: dict, base: Path) -> dict[str, float]:
    run = base / f"slurm-{time.time_ns()}"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "medgen", "run", "--executor", "slurm", *CONFIG, f"run.dir={run}", "-q"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    t_submitted = time.time()
    t_first = _wait_first_step(run)
    stages = json.loads((run / "slurm" / "jobs.json").read_text())["stages"]
    ids = [s["job_id"] for s in stages.values()]
    subprocess.run(["scancel", *ids], env=env, check=False)
    time.sleep(3)  # sacct lags 1-2 s
    times = _sacct_times(ids, env)
    prep, train = times.get(stages["prepare"]["job_id"]), times.get(stages["train"]["job_id"])
    while subprocess.run(["squeue", "-h", "-j", ",".join(ids)], env=env, capture_output=True, text=True).stdout.strip():
        time.sleep(0.5)  # the next run starts on an idle node
    return {"total": t_first - t0, "submit": t_submitted - t0, "prepare_start": prep[0] - t0,
            "prepare_end": prep[1] - t0, "train_start": train[0] - t0}


def one_local(env: dict, base: Path) -> dict[str, float]:
    run = base / f"local-{time.time_ns()}"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "medgen", "run", *CONFIG, f"run.dir={run}", "-q"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t_first = _wait_first_step(run)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"total": t_first - t0}


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    env = _slurm_env()
    load0 = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp:
        for i in range(args.repeats):
            runs.append((one_local(env, Path(tmp)), one_slurm(env, Path(tmp))))
            print(f"run {i + 1}: local {runs[-1][0]['total']:.1f} s, slurm {runs[-1][1]['total']:.1f} s "
                  f"to the first training step", file=sys.stderr, flush=True)
    load1 = os.getloadavg()[0]
    local = [r[0]["total"] for r in runs]
    slurm = {k: [r[1][k] for r in runs] for k in runs[0][1]}
    model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ln.startswith("Model name")), "?")
    ok = statistics.median(slurm["total"]) <= GOAL_S
    text = "\n".join([
        f"## SLURM executor: `medgen run` to the first training step — {dt.date.today().isoformat()}",
        "",
        f"- machine: {model}, {os.cpu_count()} cores; load average {load0:.1f} at start, {load1:.1f} at the end "
        "(shared machine: other work was running)" if max(load0, load1) > 1.5 else
        f"- machine: {model}, {os.cpu_count()} cores; load average {load0:.1f} at start, {load1:.1f} at the end",
        "- cluster: slurm/cluster.sh (one node, sched_interval=5, bf_interval=2), profile `local` (train: 2 tasks)",
        f"- command: `python bench/bench_slurm.py --repeats {args.repeats}` (config `configs/tiny.yaml`)",
        "",
        "| seconds after `medgen run` (median of %d, min, max) | value |" % args.repeats,
        "|---|---|",
        f"| baseline: `--executor local`, first training step | {_summary(local)} |",
        f"| `--executor slurm` returned (5 jobs submitted) | {_summary(slurm['submit'])} |",
        f"| prepare job started (sacct) | {_summary(slurm['prepare_start'])} |",
        f"| prepare job ended (sacct) | {_summary(slurm['prepare_end'])} |",
        f"| train job started (sacct) | {_summary(slurm['train_start'])} |",
        f"| **`--executor slurm`, first training step** | **{_summary(slurm['total'])}** |",
        "",
        f"SLURM / local: {statistics.median(slurm['total']) / statistics.median(local):.2f}x; "
        f"goal <= {GOAL_S:.0f} s: {'met' if ok else 'NOT met'}.",
        "",
    ])
    print(text)
    if not args.no_write:
        results = ROOT / "bench" / "RESULTS.md"
        head = "" if results.exists() else "# Benchmark results\n\n"
        with open(results, "a", encoding="utf-8") as f:
            f.write(head + text + "\n")


if __name__ == "__main__":
    main()
