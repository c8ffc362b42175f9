"""Training throughput and memory: medgen now vs medgen at another commit (--against), and vs TRL's SFTConfig
defaults; same model and data in one run.

Useful tokens = tokens that carry a loss (not padding). Every trainer is timed from the end of its first optimizer
step to the end of the last, so start-up and the first step's warm-up are excluded. Each medgen run is a process of
its own, so its peak resident memory (CPU) or peak allocated memory (GPU) is its own; with --against, the two
adapters' trainable weights are compared after the same steps.

    python bench/bench_train.py                      # CPU: medgen (precision auto) vs TRL defaults
    python bench/bench_train.py --only medgen --against 72acc88 --batch 8 --max-length 1024 --model smollm2-135m
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
sys.path.insert(0, str(ROOT))  # this checkout's medgen (a --worker puts the one it measures first)
SAMPLE = ROOT.parent / "shared" / "data" / "medium" / "medium-articles-500.csv"
PEAK_FLOPS = 790e12  # measured bf16 matmul on an H100 (shared/notes/device-facts.md)


def gpt2_124m(out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from medgen.models import gpt2_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(out)
    gpt2_tokenizer().save_pretrained(out)
    return out


def step_setup(model: str, batch: int, max_length: int, steps: int, overrides: list[str], sample: Path = SAMPLE,
               prefix: str = "bench-train-"):
    """medgen's build_trainer for ``model`` (gpt2-124m or a built-in) on ``sample``, prepared into a temporary folder,
    at batch x max_length for ``steps`` steps: medgen's defaults (precision auto), no validation, plus ``overrides``.
    What profile_train_step.py and step_memory.py measure; medgen is whichever is first on sys.path."""
    from medgen.config import load_config
    from medgen.models import resolve
    from medgen.train import build_trainer

    # before the prepare below: a restarted process does everything before this call again
    medgens_allocator(load_config(str(ROOT / "configs" / "tiny.yaml"), list(overrides)).run)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    model_dir = gpt2_124m(work / "model") if model == "gpt2-124m" else Path(resolve(model))
    subprocess.run([sys.executable, "-m", "medgen", "prepare", "--config", "configs/tiny.yaml", "-q",
                    f"run.dir={work}", f"data.source={sample}", f"model.name_or_path={model_dir}",
                    "data.num_shards=1"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        f"run.dir={work / 'run'}", f"data.shards={work / 'data'}", f"model.name_or_path={model_dir}",
        f"train.batch_size={batch}", f"train.max_length={max_length}", f"train.max_steps={steps}",
        "train.precision=auto", "train.validate=false", *overrides])
    return build_trainer(cfg)


def medgens_allocator(run) -> str:
    """Run this process on the malloc medgen's command line would (``run``: the run section of the measured medgen's
    config; medgen/allocator.py): may start this script again, with jemalloc preloaded. The malloc in use, for the
    results. A medgen from before run.allocator: the system's malloc, as then."""
    if not hasattr(run, "allocator"):
        return "system"
    from medgen import allocator

    allocator.ensure(run.allocator)
    return allocator.loaded() or "system"


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


def worker(spec_file: str) -> None:
    """One medgen training in this process (``--worker``): the medgen under ``spec["root"]``, the config overrides
    and steps of the spec; prints one JSON line: tokens/s, memory, the medgen measured, its adapter's file."""
    spec = json.loads(Path(spec_file).read_text())
    sys.path.insert(0, spec["root"])  # before medgen is imported: the checkout being measured
    import medgen
    from medgen.config import load_config
    from medgen.train import build_trainer

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), spec["overrides"] + [f"train.max_steps={spec['steps']}"])
    malloc = medgens_allocator(cfg.run)
    setup = build_trainer(cfg)
    trainer = setup.trainer
    block = cfg.train.max_length * cfg.train.batch_size * cfg.train.grad_accum
    counter = {"n": 0}
    clock = StepClock([counter], lambda c: c["n"])

    from transformers import TrainerCallback

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            counter["n"] += block  # packed blocks: every token is useful

    trainer.add_callback(Count())
    trainer.add_callback(clock.callback())
    before = _rss_gb()
    trainer.train()
    from safetensors.torch import save_file

    save_file({n: p.detach().float().cpu().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad},
              spec["adapter_out"])
    from medgen.throughput import peak_memory_gb  # what train_log.jsonl reports: GPU allocated, or CPU resident

    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    device = trainer.args.device
    from torch._dynamo.utils import counters  # where torch.compile split the step (0 without compile)

    graph_breaks = sum(counters["graph_break"].values())
    print(json.dumps({"tokens_per_s": clock.rate(), "medgen": str(Path(medgen.__file__).parents[1]), "losses": losses,
                      "malloc": malloc, "compiled": bool(trainer.args.torch_compile), "graph_breaks": graph_breaks,
                      "peak_memory_gb": peak_memory_gb(device),
                      "memory_before_train_gb": None if device.type == "cuda" else before,
                      "adapter": spec["adapter_out"]}))


def _rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_medgen(root: Path, overrides: list[str], steps: int, work: Path, name: str) -> dict:
    """A medgen training as a process of its own (its peak memory is its own)."""
    spec = {"root": str(root), "overrides": overrides, "steps": steps,
            "adapter_out": str(work / f"adapter-{name}.safetensors")}
    spec_file = work / f"spec-{name}.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"medgen ({name}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkout(ref: str, work: Path) -> Path:
    """This repository's tree at ``ref`` (git archive: no worktree left behind)."""
    out = work / f"medgen-{ref}"
    out.mkdir()
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def adapter_difference(a: str, b: str) -> dict:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        return {"same_tensors": False}
    diff = max(float((x[k] - y[k]).abs().max()) for k in x)  # with Adam, a change of rounding moves a weight
    # whose gradient is near zero by up to the learning rate per step: compare the losses too
    scale = max(float(x[k].abs().max()) for k in x)
    return {"same_tensors": True, "bitwise": all(torch.equal(x[k], y[k]) for k in x), "max_abs_diff": diff,
            "max_abs": scale}


# TRL baselines: SFTConfig defaults, then one default at a time switched off, to show where the time goes.
TRL_VARIANTS = {
    "defaults": {},
    "fp32": {"bf16": False},
    "fp32-nockpt": {"bf16": False, "gradient_checkpointing": False},
    "fp32-nockpt-packed": {"bf16": False, "gradient_checkpointing": False, "packing": True,
                           "packing_strategy": "wrapped"},
}


def run_trl(model_dir: Path, texts: list[str], steps: int, batch: int, max_length: int, device: str,
            overrides: dict, lora_dropout: float) -> tuple[float, bool, bool]:
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
    # the same adapter as medgen's run: r 16, alpha 32, the same dropout
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=lora_dropout, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    ref = [None]
    clock = StepClock(ref, lambda t: t._total_train_tokens)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[clock.callback()])
    ref[0] = trainer
    trainer.train()
    return clock.rate(), args.bf16, args.gradient_checkpointing


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    from medgen.config import LoraConfig, TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="gpt2-124m", choices=["gpt2-124m", "smollm2-135m"],
                    help="gpt2-124m: GPT2Config() at random init; smollm2-135m: the offline built-in (pretrained)")
    ap.add_argument("--steps", type=int, default=4)
    # medgen's own defaults: what a user who changes nothing gets is what is measured
    ap.add_argument("--batch", type=int, default=TrainConfig().batch_size)
    ap.add_argument("--max-length", type=int, default=TrainConfig().max_length)
    ap.add_argument("--lora-dropout", type=float, default=LoraConfig().dropout,
                    help="LoRA dropout of every adapter measured, medgen's and TRL's (default: medgen's default)")
    ap.add_argument("--only", choices=["both", "medgen", "trl"], default="both")
    ap.add_argument("--against", metavar="GIT_REF", default="",
                    help="also measure medgen at this commit (same data, settings, steps) and compare the adapters")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra medgen config override, e.g. train.compile=off")
    ap.add_argument("--sample", type=Path, default=SAMPLE, help="Kaggle-schema CSV of real articles")
    ap.add_argument("--trl", default="defaults", help=f"comma-separated TRL baselines: {', '.join(TRL_VARIANTS)}")
    ap.add_argument("--trl-steps", type=int, default=0, help="steps per TRL baseline (default: --steps)")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if not args.sample.exists():
        sys.exit(f"real Medium sample not found at {args.sample}")
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if args.model == "gpt2-124m":
        model_dir = gpt2_124m(work / "gpt2-124m")
    else:
        from medgen.models import resolve

        model_dir = Path(resolve(args.model))
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
    # validation off: the training step is what is measured (bench_validation.py measures validation)
    common = [f"data.shards={data}", f"model.name_or_path={model_dir}", f"train.batch_size={args.batch}",
              f"train.max_length={args.max_length}", f"train.precision={precision}", "train.logging_steps=1",
              f"lora.dropout={args.lora_dropout}", "train.warmup_steps=1", "train.validate=false", *args.set]
    ours, medgen_runs = None, {}
    if args.only in ("both", "medgen"):
        roots = {"now": ROOT, **({args.against: checkout(args.against, work)} if args.against else {})}
        for name, root in roots.items():
            medgen_runs[name] = run_medgen(root, [f"run.dir={work / ('run-' + name)}", *common], args.steps, work,
                                           name.replace("/", "_"))
        ours = medgen_runs["now"]["tokens_per_s"]
        if args.against:
            then = medgen_runs[args.against]
            medgen_runs["now"].update(
                speedup=ours / then["tokens_per_s"], memory_ratio=medgen_runs["now"]["peak_memory_gb"] / then["peak_memory_gb"],
                adapter_vs_then=adapter_difference(medgen_runs["now"]["adapter"], then["adapter"]),
                loss_rel_diff=[abs(a - b) / abs(b) for a, b in zip(medgen_runs["now"]["losses"], then["losses"])])
    baselines = {}
    if args.only in ("both", "trl"):
        for name in args.trl.split(","):
            rate, bf16, ckpt = run_trl(model_dir, texts, args.trl_steps or args.steps, args.batch, args.max_length,
                                       args.device, TRL_VARIANTS[name], args.lora_dropout)
            baselines[name] = {"tokens_per_s": rate, "bf16": bf16, "gradient_checkpointing": ckpt}
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "model": args.model,
           "threads": torch.get_num_threads(), "batch": args.batch, "max_length": args.max_length,
           "steps": args.steps, "medgen_precision": precision, "medgen_tokens_per_s": ours, "medgen": medgen_runs,
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
