"""Where one of medgen's LoRA training steps goes: time and memory by operator (torch.profiler) of the last of
``--steps`` steps of medgen's own trainer (build_trainer: TRL SFTTrainer, the fused LM head, medgen's callbacks),
and the process's peak resident memory before and after training.

    python bench/profile_train_step.py --model gpt2-124m --batch 4 --max-length 512
    python bench/profile_train_step.py --model smollm2-135m --batch 8 --max-length 1024 --set train.token_metrics=true

gpt2-124m is GPT2Config() at random init (speed and memory do not depend on the weights); smollm2-135m the offline
built-in. Data: the real Medium sample, prepared once per model into a temporary folder. Also prints an fp32
matmul rate, the ceiling for the matrix products.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_train import SAMPLE, _rss_gb, step_setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-124m", choices=["gpt2-124m", "smollm2-135m"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="steps; the last one is profiled")
    ap.add_argument("--rows", type=int, default=15, help="profiler rows to print")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="medgen config override")
    ap.add_argument("--sample", type=Path, default=SAMPLE)
    ap.add_argument("--root", type=Path, default=ROOT, help="the medgen checkout to profile (e.g. an older commit's "
                    "tree from `git archive`); the data is prepared with this one")
    args = ap.parse_args()
    sys.path.insert(0, str(args.root))  # before medgen is first imported: every medgen module is --root's
    os.environ["HF_HUB_OFFLINE"] = "1"
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    setup = step_setup(args.model, args.batch, args.max_length, args.steps, ["train.logging_steps=1000", *args.set],
                       args.sample, prefix="profile-train-")
    loaded = _rss_gb()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    seconds = {}

    class Profile(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.steps - 1:
                seconds["t0"] = time.perf_counter()
                prof.start()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.steps:
                prof.stop()
                seconds["step"] = time.perf_counter() - seconds["t0"]

    setup.trainer.add_callback(Profile())
    setup.trainer.train()
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(table.table(sort_by="self_cpu_memory_usage", row_limit=8))
    tokens = args.batch * args.max_length
    import medgen

    print(f"{args.model}, {args.batch} x {args.max_length}, precision {setup.precision}, overrides {args.set}, "
          f"medgen from {Path(medgen.__file__).parents[1]}")
    print(f"step: {seconds['step']:.1f} s (profiled) = {tokens / seconds['step']:.0f} tokens/s")
    from medgen.throughput import peak_memory_gb

    print(f"resident memory: {loaded:.2f} GB with the model loaded, "
          f"peak {peak_memory_gb(torch.device('cpu')):.2f} GB")
    a, b = torch.randn(2048, 768), torch.randn(768, 3072)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    print(f"fp32 matmul 2048x768x3072: {2 * 2048 * 768 * 3072 * 10 / (time.perf_counter() - t0) / 1e9:.0f} GFLOP/s "
          f"on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
