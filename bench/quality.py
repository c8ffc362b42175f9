"""Quality benchmark: does LoRA fine-tuning on real Medium articles lower held-out perplexity?

    python bench/quality.py                  # SmolLM2-135M (offline built-in), ~30 min on 2 cores
    python bench/quality.py --model gpt2     # GPT-2 small, where its weights are reachable

One command driving the ``medgen`` CLI stages with overrides, nothing else:

1. ``medgen prepare`` the real sample (``../shared/data/medium/medium-articles-500.csv``, read at run
   time) into ``<workdir>/data``: train/validation/test by a hash of the URL (10% test).
2. calibrate: ``medgen train`` for 3 steps in ``<workdir>/calibrate`` to measure seconds per step on
   this machine (skipped with ``--steps``).
3. ``medgen train``: LoRA r=16, alpha 32, dropout 0, on every linear layer of the blocks (the
   medgen default: all-linear; GPT-2: c_attn, c_proj, c_fc), batches of 2 packed blocks of 512 tokens,
   lr 1e-3 with cosine decay after 10 warm-up steps, seed 42; as many steps as fit in ``--minutes``.
4. ``medgen evaluate``: base (adapter off) and tuned (adapter on) from one loaded model on the first
   ``--eval-articles`` test articles in full (sliding window, context 512, stride 256), with the paired
   bootstrap 95% interval of the perplexity difference over articles.

Goal: tuned <= 0.85 x base, and the paired interval of (tuned - base) excludes zero. Exit code 0 when it is
met, 3 when it is not, 1 when a stage fails, 2 without the CSV. A section is appended to bench/RESULTS.md (not with
--no-record). The Hugging Face hub is used only if the environment allows it (``HF_HUB_OFFLINE``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "medium" / "medium-articles-500.csv"
GOAL_RATIO = 0.85
CALIBRATION_STEPS = 3
# share of --minutes given to optimizer steps; the rest covers loading the model and saving the adapter
STEP_SHARE = 0.92


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=28.0, help="training budget in minutes (steps are fitted to it)")
    p.add_argument("--steps", type=int, default=0, help="train exactly this many steps (skips the calibration)")
    p.add_argument("--model", default="smollm2-135m", help="model.name_or_path: smollm2-135m, gpt2, a directory")
    p.add_argument("--csv", default=str(DEFAULT_CSV), help="real Medium articles CSV (Kaggle schema)")
    p.add_argument("--workdir", default="", help="run directory (default runs/quality-<model>)")
    p.add_argument("--eval-articles", type=int, default=24, help="test articles scored in full (0 = the whole split)")
    p.add_argument("--context", type=int, default=512, help="eval.context")
    p.add_argument("--stride", type=int, default=256, help="eval.stride")
    p.add_argument("--max-length", type=int, default=512, help="train.max_length (tokens per packed block)")
    p.add_argument("--batch-size", type=int, default=2, help="train.batch_size")
    p.add_argument("--lr", type=float, default=1e-3, help="train.learning_rate")
    p.add_argument("--rank", type=int, default=16, help="lora.r (alpha = 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="lora.dropout (0 skips a copy of every "
                   "adapted layer's input: ~23%% faster steps on CPU than 0.05)")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def medgen(stage: str, overrides: list[str], log: list[str]) -> None:
    """One CLI stage in a fresh process, as a user would type it; the command is kept for the record."""
    cmd = [sys.executable, "-m", "medgen", stage, "-q", *overrides]
    log.append("medgen " + " ".join(shlex.quote(x) for x in cmd[3:]))
    print(f"$ {log[-1]}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"quality: medgen {stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def common(args, run_dir: Path) -> list[str]:
    return [f"run.dir={run_dir}", f"run.name=quality-{Path(args.model).name}", f"data.source={args.csv}",
            f"data.shards={Path(args.workdir) / 'data'}", f"model.name_or_path={args.model}"]


def train_overrides(args, steps: int) -> list[str]:
    return [f"train.max_steps={steps}", f"train.batch_size={args.batch_size}", f"train.max_length={args.max_length}",
            f"train.learning_rate={args.lr}", "train.lr_scheduler=cosine", f"train.warmup_steps={min(10, steps // 10)}",
            "train.seed=42", "train.precision=auto", "train.logging_steps=1", f"lora.r={args.rank}",
            f"lora.alpha={2 * args.rank}", f"lora.dropout={args.lora_dropout}"]


def seconds_per_step(run_dir: Path) -> float:
    """From train_log.jsonl: time between the first and last logged step (the first step warms up)."""
    recs = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["time"]) for r in recs if "loss" in r]
    (s0, t0), (s1, t1) = steps[0], steps[-1]
    return (t1 - t0) / max(1, s1 - s0)


def fit_steps(args, log: list[str]) -> tuple[int, float]:
    if args.steps:
        return args.steps, float("nan")
    cal = Path(args.workdir) / "calibrate"
    medgen("train", common(args, cal) + train_overrides(args, CALIBRATION_STEPS), log)
    sps = seconds_per_step(cal)
    return max(1, int(args.minutes * 60 * STEP_SHARE / sps)), sps


def main(argv=None) -> int:
    args = parse_args(argv)
    if not Path(args.csv).exists():
        print(f"quality: {args.csv} not found (the real Medium sample lives in ../shared/data/medium)")
        return 2
    args.workdir = args.workdir or str(ROOT / "runs" / f"quality-{Path(args.model).name}")
    run_dir, log, t_start = Path(args.workdir) / "run", [], time.time()
    for stale in (run_dir, Path(args.workdir) / "calibrate"):  # train would resume and append to old logs
        shutil.rmtree(stale, ignore_errors=True)
    medgen("prepare", common(args, run_dir) + ["data.num_shards=2"], log)
    steps, sps = fit_steps(args, log)
    t0 = time.time()
    medgen("train", common(args, run_dir) + train_overrides(args, steps), log)
    train_min = (time.time() - t0) / 60
    scoring = [f"eval.max_articles={args.eval_articles}", f"eval.context={args.context}", f"eval.stride={args.stride}",
               "eval.batch_size=8"]
    medgen("evaluate", common(args, run_dir) + scoring, log)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    ok = goal_met(metrics)
    report = summarise(args, metrics, log, steps, sps, train_min, (time.time() - t_start) / 60, ok)
    print(report)
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(report + "\n")
    return 0 if ok else 3


def goal_met(m: dict) -> bool:
    d = m["delta"]
    return d["ratio"] <= GOAL_RATIO and (d["ci95"][1] < 0 or d["ci95"][0] > 0)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores"


def summarise(args, m: dict, log: list[str], steps: int, sps: float, train_min: float, total_min: float,
              ok: bool) -> str:
    b, t, d = m["base"], m["tuned"], m["delta"]
    cmd = "python bench/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    calib = f", calibrated at {sps:.1f} s/step" if not math.isnan(sps) else ""
    return "\n".join([
        f"## quality — {args.model} — {datetime.date.today().isoformat()}",
        "",
        f"- machine: {machine()}; command: `{cmd.strip()}`",
        f"- LoRA r={args.rank} alpha {2 * args.rank} dropout {args.lora_dropout}, {steps} steps x "
        f"{args.batch_size}x{args.max_length} packed tokens, lr {args.lr} cosine{calib}; "
        f"training {train_min:.1f} min, whole benchmark {total_min:.1f} min",
        f"- evaluated: {b['articles']} test articles in full, {b['tokens']} predicted tokens, "
        f"{m['method']} context {m['context']} stride {m['stride']}",
        "",
        "| model | perplexity | 95% CI | bits/byte |",
        "|---|---|---|---|",
        f"| base | {b['perplexity']:.2f} | {b['ci95'][0]:.2f}–{b['ci95'][1]:.2f} | {b['bits_per_byte']:.4f} |",
        f"| tuned | {t['perplexity']:.2f} | {t['ci95'][0]:.2f}–{t['ci95'][1]:.2f} | {t['bits_per_byte']:.4f} |",
        "",
        f"Tuned/base = **{d['ratio']:.3f}** (goal <= {GOAL_RATIO}); paired 95% CI of tuned - base: "
        f"{d['ci95'][0]:.2f} to {d['ci95'][1]:.2f} -> **{'goal met' if ok else 'goal NOT met'}**.",
        "",
        "Stages run:",
        "",
        *[f"    {c}" for c in log],
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
