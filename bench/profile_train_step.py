"""Where one LoRA training step of GPT-2 124M goes on this CPU: a torch.profiler table of one step.

    python bench/profile_train_step.py                    # base dropout 0.1 kept (the model's own)
    python bench/profile_train_step.py --model-dropout 0  # medgen's default train.model_dropout

Random init, batch 4 x 512, LoRA r=16 on c_attn/c_proj/c_fc, fp32, SDPA attention; the last of three
steps is profiled. Also prints a fp32 matmul rate, the ceiling for the matrix products.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dropout", type=float, default=None, help="dropout inside the base (default: keep 0.1)")
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--rows", type=int, default=14, help="profiler rows to print")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import GPT2Config, GPT2LMHeadModel

    from medgen.models import set_dropout

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="sdpa"))
    if args.model_dropout is not None:
        set_dropout(model, args.model_dropout)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout, fan_in_fan_out=True,
                                             target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 512))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"step: {seconds:.1f} s (profiled) = {ids.numel() / seconds:.0f} tokens/s")
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
