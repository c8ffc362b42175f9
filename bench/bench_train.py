"""Training throughput: medgen vs TRL's SFTConfig defaults, same model (GPT-2 124M, random init) and data.

Useful tokens = tokens that carry a loss (not padding). Both trainers are timed from the end of their
first optimizer step to the end of the last, so start-up and the first step's warm-up are excluded.

    python bench/bench_train.py                      # CPU: medgen (precision auto) vs TRL defaults
    python bench/bench_train.py --only trl --trl fp32,fp32-nockpt,fp32-nockpt-packed   # where TRL's time goes
    python bench/bench_train.py --device cuda        # GPU: bf16, 1024 tokens, MFU against 790 TFLOP/s
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from medgen.config import TrainConfig  # noqa: E402 (this checkout's medgen)
SAMPLE = ROOT.parent / "shared" / "data" / "medium" / "medium-articles-500.csv"
PEAK_FLOPS = 790e12  # measured bf16 matmul on an H100 (shared/notes/device-facts.md)


def gpt2_124m(out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from medgen.models import gpt2_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(out)
    gpt2_tokenizer().save_pretrained(out)
    return out


class StepClock:
    def __init__(self, trainer_ref, useful):
        self.ref, self.useful, self.marks = trainer_ref, useful, []

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class _C(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if args.device.type == "cuda":
                    torch.cuda.synchronize()
                clock.marks.append((time.perf_counter(), clock.useful(clock.ref[0])))

        return _C()

    def rate(self) -> float:
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / (t1 - t0)


def run_medgen(cfg_overrides: list[str], steps: int) -> float:
    from medgen.config import load_config
    from medgen.train import build_trainer

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), cfg_overrides + [f"train.max_steps={steps}"])
    trainer = build_trainer(cfg).trainer
    block = cfg.train.max_length * cfg.train.batch_size * cfg.train.grad_accum
    counter = {"n": 0}
    clock = StepClock([counter], lambda c: c["n"])

    from transformers import TrainerCallback

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            counter["n"] += block  # packed blocks: every token is useful

    trainer.add_callback(Count())
    trainer.add_callback(clock.callback())
    trainer.train()
    return clock.rate()


# TRL baselines: SFTConfig defaults, then one default at a time switched off, to show where the time goes.
TRL_VARIANTS = {
    "defaults": {},
    "fp32": {"bf16": False},
    "fp32-nockpt": {"bf16": False, "gradient_checkpointing": False},
    "fp32-nockpt-packed": {"bf16": False, "gradient_checkpointing": False, "packing": True,
                           "packing_strategy": "wrapped"},
}


def run_trl(model_dir: Path, texts: list[str], steps: int, batch: int, max_length: int, device: str,
            overrides: dict) -> tuple[float, bool, bool]:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = datasets.Dataset.from_dict({"text": texts})
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                     max_length=max_length, use_cpu=device == "cpu", report_to=[], save_strategy="no",
                     logging_steps=1000, disable_tqdm=True, **overrides)
    # the same adapter as medgen's run: r 16, alpha 32, dropout 0.05 (also `trl sft`'s default lora_dropout)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    ref = [None]
    clock = StepClock(ref, lambda t: t._total_train_tokens)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[clock.callback()])
    ref[0] = trainer
    trainer.train()
    return clock.rate(), args.bf16, args.gradient_checkpointing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=4)
    # medgen's own defaults: what a user who changes nothing gets is what is measured
    ap.add_argument("--batch", type=int, default=TrainConfig().batch_size)
    ap.add_argument("--max-length", type=int, default=TrainConfig().max_length)
    ap.add_argument("--only", choices=["both", "medgen", "trl"], default="both")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra medgen config override, e.g. train.sft_args={torch_compile: true}")
    ap.add_argument("--sample", type=Path, default=SAMPLE, help="Kaggle-schema CSV of real articles")
    ap.add_argument("--trl", default="defaults", help=f"comma-separated TRL baselines: {', '.join(TRL_VARIANTS)}")
    ap.add_argument("--trl-steps", type=int, default=0, help="steps per TRL baseline (default: --steps)")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if not args.sample.exists():
        sys.exit(f"real Medium sample not found at {args.sample}")
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model_dir = gpt2_124m(work / "gpt2-124m")
    data = work / "data"
    subprocess.run([sys.executable, "-m", "medgen", "prepare", "--config", "configs/tiny.yaml", "-q",
                    f"run.dir={work}", f"data.source={args.sample}", f"model.name_or_path={model_dir}",
                    "data.num_shards=1"], cwd=ROOT, check=True)
    import pyarrow.parquet as pq

    texts = []
    for f in sorted((data / "train").glob("*.parquet")):
        t = pq.read_table(f, columns=["title", "text"]).to_pylist()
        texts += [f"{r['title']}\n\n{r['text']}" for r in t]
    from medgen.train import cpu_has_fast_bf16

    # what `medgen train` picks (precision auto): fp32 on a CPU without avx512_bf16/AMX, where bf16 is emulated
    precision = "bf16" if args.device == "cuda" or cpu_has_fast_bf16() else "fp32"
    ours = trl = None
    if args.only in ("both", "medgen"):
        ours = run_medgen([f"run.dir={work / 'run'}", f"data.shards={data}", f"model.name_or_path={model_dir}",
                           f"train.batch_size={args.batch}", f"train.max_length={args.max_length}",
                           f"train.precision={precision}", "train.logging_steps=1000", "lora.dropout=0.05",
                           "train.warmup_steps=1", *args.set], args.steps)
    baselines = {}
    if args.only in ("both", "trl"):
        for name in args.trl.split(","):
            rate, bf16, ckpt = run_trl(model_dir, texts, args.trl_steps or args.steps, args.batch, args.max_length,
                                       args.device, TRL_VARIANTS[name])
            baselines[name] = {"tokens_per_s": rate, "bf16": bf16, "gradient_checkpointing": ckpt}
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "batch": args.batch, "max_length": args.max_length,
           "steps": args.steps, "medgen_precision": precision, "medgen_tokens_per_s": ours,
           "trl": baselines, "overrides": args.set}
    if ours:
        for b in baselines.values():
            b["medgen_speedup"] = ours / b["tokens_per_s"]
    if args.device == "cuda" and ours and args.max_length == 1024:
        # LoRA SFT of GPT-2 124M at 1024 tokens: ~554 MFLOP per token (shared/notes/device-facts.md)
        res["mfu"] = ours * 554e6 / PEAK_FLOPS
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
