"""What the watchdog costs a training step: `medgen train` with the heartbeats and watchdog on (the default)
vs off (`run.hang_timeout=0`), same data, same run; rounds alternate the order.

The watchdog adds an attribute write per micro-batch and step (`watchdog.progress`) and a thread that writes
a small heartbeat file every few seconds. The default model here is the 2-layer tiny-gpt2, whose steps are
the shortest medgen trains (so the relative cost is the largest it can be); goal: at most +1% of the time.

    .venv/bin/python bench/bench_watchdog.py                     # tiny-gpt2, 200 steps, 3 rounds
    .venv/bin/python bench/bench_watchdog.py --model smollm2-135m --set train.max_steps=30 --rounds 2

Results are appended to bench/RESULTS.md (machine, command, date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_validation import ROOT, SAMPLE, medgen, train  # noqa: E402 (the same runner)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--source", type=Path, default=SAMPLE, help="articles CSV (Kaggle Medium schema)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", action="append", default=None, help="a config override for both runs (repeatable)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    args.set = args.set if args.set is not None else ["train.max_steps=200", "train.validate=false"]
    with tempfile.TemporaryDirectory(prefix="medgen-bench-watchdog-") as tmp:
        work = Path(tmp)
        medgen("prepare", "-q", f"run.dir={work}", f"data.source={args.source}", f"model.name_or_path={args.model}")
        runs: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(args.rounds):
            for which in (("off", "on") if i % 2 == 0 else ("on", "off")):
                extra = ("run.hang_timeout=0",) if which == "off" else ()
                runs[which].append(train(work, f"{which}-{i}", work / "data", args, *extra)["seconds"])
                print(which, runs[which][-1], flush=True)
    t_on, t_off = statistics.median(runs["on"]), statistics.median(runs["off"])
    cost = t_on / t_off - 1
    print(f"watchdog on: {t_on:.2f} s, off: {t_off:.2f} s: {cost:+.2%}")
    cmd = "python bench/bench_watchdog.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "", f"## watchdog and heartbeats: on vs off, {args.model} on cpu ({dt.date.today()})", "",
        f"- machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, 1-min load "
        f"average {os.getloadavg()[0]:.1f} at the end; data: `{os.path.relpath(args.source, ROOT)}`; settings: "
        f"medgen's defaults + {' '.join(args.set)}",
        f"- command: `{cmd.strip()}`", "",
        "| run | train_runtime s (each round) |", "|---|---|",
        *[f"| watchdog {k} | {', '.join(f'{x:.2f}' for x in v)} |" for k, v in runs.items()], "",
        f"The watchdog costs **{cost:+.2%}** of the training time (median of rounds; goal: at most +1%).",
    ]
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
