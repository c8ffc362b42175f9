"""What validation during training costs: `medgen train` with the default validation on vs off, same run.

Both runs train the same steps on the same data (the adapters are equal: validation changes nothing in training);
the cost is the Trainer's train_runtime with validation over the one without, minus 1. Rounds alternate the
order (off, on, on, off, ...) so that a machine getting faster or slower during the run does not favour one.

    .venv/bin/python bench/bench_validation.py          # smollm2-135m, medgen's TrainConfig defaults, real articles
    .venv/bin/python bench/bench_validation.py --rounds 2 --set train.max_steps=60

Results are appended to bench/RESULTS.md (machine, command, date).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "medium" / "medium-articles-500.csv"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def medgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medgen", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True, env={**os.environ, "ACCELERATE_USE_CPU": "true"})


def train(work: Path, name: str, data: Path, args, *extra: str) -> dict:
    run = work / name
    medgen("train", f"run.dir={run}", f"data.shards={data}", f"model.name_or_path={args.model}", *args.set, *extra)
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    record = json.loads((run / "adapter" / "medgen_config.json").read_text())["resolved"]
    return {"seconds": next(r["train_runtime"] for r in reversed(log) if "train_runtime" in r),
            "evaluations": sum("eval_loss" in r for r in log), "validation": record.get("validation") or {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--source", type=Path, default=SAMPLE, help="articles CSV (Kaggle Medium schema)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="a config override for both runs (repeatable)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="medgen-bench-val-") as tmp:
        work = Path(tmp)
        medgen("prepare", "-q", f"run.dir={work}", f"data.source={args.source}", f"model.name_or_path={args.model}")
        on, off = [], []
        for i in range(args.rounds):
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            for which in order:
                extra = ("train.validate=false",) if which == "off" else ()
                (off if which == "off" else on).append(train(work, f"{which}-{i}", work / "data", args, *extra))
                print(which, (off if which == "off" else on)[-1], flush=True)
    t_on, t_off = statistics.median(r["seconds"] for r in on), statistics.median(r["seconds"] for r in off)
    cost = t_on / t_off - 1
    v = on[-1]["validation"]
    print(f"validation on: {t_on:.1f} s, off: {t_off:.1f} s: validation costs {cost:+.1%} of training "
          f"({on[-1]['evaluations']} evaluations of {v.get('articles')} articles, {v.get('tokens')} tokens)")
    if args.results:
        _append(Path(args.results), args, on, off, cost)


def _append(path: Path, args, on: list[dict], off: list[dict], cost: float) -> None:
    import platform

    v = on[-1]["validation"]
    t_off, t_on = (", ".join(f"{r['seconds']:.1f}" for r in runs) for runs in (off, on))
    cmd = "python bench/bench_validation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "", f"## validation during training: on vs off, {args.model} on cpu ({dt.date.today()})", "",
        f"- machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
        f"data: `{os.path.relpath(args.source, ROOT)}`; settings: medgen's defaults{' + ' + ' '.join(args.set) if args.set else ''}",
        f"- command: `{cmd.strip()}`",
        f"- validation (the default): {on[-1]['evaluations']} evaluation(s) of {v.get('articles')} article(s), "
        f"{v.get('tokens')} tokens, every {v.get('every')} steps ({v.get('chosen')})", "",
        "| run | train_runtime s (each round) |", "|---|---|",
        f"| validation off | {t_off} |", f"| validation on | {t_on} |", "",
        f"Validation costs **{cost:+.1%}** of the training time (median of rounds; goal: at most +5%).",
    ]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
