"""SLURM executor latency: seconds from `medgen run --executor slurm` to the first training step on the
local clusters (slurm/cluster.sh up --nodes N; brought up here if needed), against the same pipeline with
`--executor local` (the baseline), for each node count asked.

    python bench/bench_slurm.py                 # 1 and 2 nodes, 3 runs each, appended to bench/RESULTS.md
    python bench/bench_slurm.py --nodes 2 --repeats 1 --no-write

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


def _slurm_env(nodes: int) -> dict:
    """The environment for the cluster of that many nodes (SLURM_CONF), started if it is not up."""
    env_sh = Path(os.environ.get("MEDGEN_INFRA", "/tmp/medgen-infra")) / f"slurm-{nodes}node" / "env.sh"
    subprocess.run(["bash", str(ROOT / "slurm" / "cluster.sh"), "up", "--nodes", str(nodes)], check=True,
                   stdout=subprocess.DEVNULL)
    conf = subprocess.run(["bash", "-c", f"source {env_sh} && echo $SLURM_CONF"], capture_output=True,
                          text=True, check=True).stdout.strip()
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SLURM_CONF": conf}


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


def one_slurm(env: dict, base: Path, nodes: int) -> dict[str, float]:
    run = base / f"slurm-{time.time_ns()}"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "medgen", "run", "--executor", "slurm", *CONFIG, f"run.dir={run}",
                    f"slurm.nodes={nodes}", "-q"],
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
    ap.add_argument("--nodes", default="1,2", help="node counts to measure, each on its own local cluster")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md")
    args = ap.parse_args()
    sizes = [int(n) for n in args.nodes.split(",")]
    envs = {n: _slurm_env(n) for n in sizes}
    load0 = os.getloadavg()[0]
    local: list[float] = []
    slurm: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp:
        for i in range(args.repeats):  # interleaved, so that a busier minute hits every variant alike
            local.append(one_local(envs[sizes[0]], Path(tmp))["total"])
            for n in sizes:
                slurm[n].append(one_slurm(envs[n], Path(tmp), n))
            print(f"run {i + 1}: local {local[-1]:.1f} s; " + ", ".join(
                f"{n} node(s) {slurm[n][-1]['total']:.1f} s" for n in sizes) + " to the first training step",
                file=sys.stderr, flush=True)
    load1 = os.getloadavg()[0]
    col = {n: {k: [r[k] for r in slurm[n]] for k in slurm[n][0]} for n in sizes}
    model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ln.startswith("Model name")), "?")
    ok = all(statistics.median(col[n]["total"]) <= GOAL_S for n in sizes)
    row = lambda label, key: f"| {label} | " + " | ".join(_summary(col[n][key]) for n in sizes) + " |"  # noqa: E731
    busy = " (shared machine: other work was running)" if max(load0, load1) > 1.5 else ""
    text = "\n".join([
        f"## SLURM executor: `medgen run` to the first training step — {dt.date.today().isoformat()}",
        "",
        f"- machine: {model}, {os.cpu_count()} cores; load average {load0:.1f} at start, {load1:.1f} at the end{busy}",
        "- clusters: `slurm/cluster.sh up --nodes N` (each node a network + UTS namespace on this machine, "
        "sched_interval=5, bf_interval=2), profile `local` with `slurm.nodes=N` (train: one task per node)",
        f"- command: `python bench/bench_slurm.py --nodes {args.nodes} --repeats {args.repeats}` "
        "(config `configs/tiny.yaml`)",
        "",
        f"| seconds after `medgen run` (median of {args.repeats}, min, max) | "
        + " | ".join(f"{n} node(s)" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
        "| baseline: `--executor local`, first training step | " + " | ".join(_summary(local) for _ in sizes) + " |",
        row("`--executor slurm` returned (5 jobs checked and submitted)", "submit"),
        row("prepare job started (sacct)", "prepare_start"),
        row("prepare job ended (sacct)", "prepare_end"),
        row("train job started (sacct)", "train_start"),
        row("**`--executor slurm`, first training step**", "total"),
        "",
        "SLURM / local: " + ", ".join(f"{n} node(s) {statistics.median(col[n]['total']) / statistics.median(local):.2f}x"
                                      for n in sizes) + f"; goal <= {GOAL_S:.0f} s: {'met' if ok else 'NOT met'}.",
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
