"""New tokens per second: `medgen generate` (a whole subprocess) vs transformers.pipeline, one prompt at a time.

Both decode greedily and exactly --new-tokens new tokens per prompt (end-of-text suppressed with
min_new_tokens = max_new_tokens in both), on the same model, dtype and device. New tokens are counted
from token ids, never from text: the pipeline's returned ids minus the prompt's, medgen's
`completion_tokens` (checked to be exactly --new-tokens on every line).

- baseline: `pipeline("text-generation")` called once per prompt over --baseline-prompts prompts (every
  k-th prompt, so their lengths match the whole set); pipeline construction and one warm-up call untimed.
- medgen: `python -m medgen generate` over all --prompts prompts, timed as a whole: interpreter start,
  imports, model load and the final merge included.

    .venv/bin/python bench/bench_generate.py                       # CPU: smollm2-135m, 128 prompts
    .venv/bin/python bench/bench_generate.py --config configs/demo.yaml   # what the demo config gives
    python bench/bench_generate.py --device cuda --model gpt2-random --prompts 256

`gpt2-random` is GPT-2 124M (`GPT2LMHeadModel(GPT2Config())`, seed 0) saved to a temp dir: throughput does
not depend on the weights. Results are appended to bench/RESULTS.md (machine, command, date).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's medgen, whatever the venv's editable install points at
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# decode is memory-bound: one step reads all weights plus the whole KV cache
HBM_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.8e12}


def make_prompts(n: int) -> list[dict]:
    """n prompts of 8 to 40 words cut from the bundled demo articles (deterministic)."""
    from medgen.config import DEMO_ARTICLES

    with open(DEMO_ARTICLES, encoding="utf-8", newline="") as f:
        texts = [r["text"].split() for r in csv.DictReader(f) if len((r.get("text") or "").split()) >= 80]
    out = []
    for i in range(n):
        words = texts[i % len(texts)]
        start = (i // len(texts)) * 37 % (len(words) - 41)
        out.append({"id": f"b{i:04d}", "prompt": " ".join(words[start:start + 8 + (i * 13) % 33])})
    return out


def resolve_model(name: str, tmp: Path) -> str:
    """A directory from_pretrained can load; built-ins are materialised (once, untimed) first."""
    from medgen import models

    if name != "gpt2-random":
        return models.resolve(name)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp / "gpt2-random"
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    models.gpt2_tokenizer().save_pretrained(path)
    return str(path)


def baseline(path: str, prompts: list[dict], new_tokens: int, device: str) -> tuple[int, float]:
    """(new tokens, seconds) of pipeline("text-generation") called once per prompt."""
    import torch
    from transformers import pipeline

    pipe = pipeline("text-generation", model=path, device=device, dtype=torch.float32)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_tensors=True,
              pad_token_id=pipe.tokenizer.eos_token_id)
    pipe(prompts[-1]["prompt"], **kw)  # warm-up, untimed
    n, t0 = 0, time.perf_counter()
    for p in prompts:
        ids = pipe(p["prompt"], **kw)[0]["generated_token_ids"]
        n += len(ids) - len(pipe.tokenizer(p["prompt"], add_special_tokens=False)["input_ids"])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def run_medgen(model: str, prompts_file: Path, run_dir: Path, args) -> tuple[int, float, list[str]]:
    """(new tokens, seconds, command) of one whole `medgen generate` process; sets args.batch_size to the
    batch size medgen used (its own default unless --batch-size was given)."""
    cmd = [sys.executable, "-m", "medgen", "generate", *(["--config", args.config] if args.config else []),
           f"model.name_or_path={model}", f"run.dir={run_dir}", "model.base_only=true",
           f"generate.prompts={prompts_file}", f"generate.max_new_tokens={args.new_tokens}",
           f"generate.min_new_tokens={args.new_tokens}", f"generate.dtype={args.dtype}",
           *([f"generate.batch_size={args.batch_size}"] if args.batch_size else [])]
    env = {**os.environ}
    if args.device == "cpu":
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"medgen generate failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    used = re.search(r"generate: (\d+) prompts per batch", proc.stderr)
    args.batch_size, args.batch_note = int(used.group(1)), "" if args.batch_size else " (medgen's default)"
    lines = (run_dir / "generations" / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    counts = [json.loads(line)["completion_tokens"] for line in lines]
    assert len(counts) == args.prompts and set(counts) == {args.new_tokens}, "every completion must be full length"
    return sum(counts), seconds, cmd


def bandwidth_limit(path: str, prompts: list[dict], args) -> tuple[float, str]:
    """Upper bound on decode tokens/s from memory bandwidth, and the formula with its numbers."""
    from transformers import AutoConfig, AutoTokenizer

    c, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    n_layer = getattr(c, "n_layer", None) or c.num_hidden_layers
    hidden = getattr(c, "n_embd", None) or c.hidden_size
    heads = getattr(c, "n_head", None) or c.num_attention_heads
    kv_dim = (getattr(c, "num_key_value_heads", None) or heads) * (hidden // heads)
    elem = 4 if args.dtype == "float32" else 2
    params = _param_count(path)
    batch = min(args.batch_size, args.prompts)
    ctx = sum(len(tok(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts) / len(prompts) + args.new_tokens / 2
    weights, kv = params * elem, 2 * n_layer * kv_dim * elem * ctx * batch
    card = _card(args.device)
    bw = args.bandwidth or HBM_BYTES_PER_S.get(card, 0.0)
    if not bw:
        return float("nan"), (f"tokens/s <= batch * BW / (weight bytes + KV bytes per step) = {batch} * BW / "
                              f"({weights / 1e9:.3f} + {kv / 1e9:.3f}) GB; no BW figure for this device (--bandwidth)")
    limit = batch * bw / (weights + kv)
    formula = (f"tokens/s <= batch * BW / (weight bytes + KV bytes per step) = {batch} * {bw / 1e12:.1f}e12 B/s / "
               f"({params / 1e6:.1f}M params * {elem} B + 2 * {n_layer} layers * {kv_dim} * {elem} B * {ctx:.0f} ctx * "
               f"{batch}) = {batch} * {bw / 1e12:.1f}e12 / ({weights / 1e9:.3f} + {kv / 1e9:.3f}) GB = {limit:,.0f} ({card or '--bandwidth'})")
    return limit, formula


def _param_count(path: str) -> int:
    from safetensors import safe_open

    n = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            n += sum(math.prod(s.get_slice(k).get_shape()) for k in s.keys())
    return n


def _card(device: str) -> str:
    if not device.startswith("cuda"):
        return ""
    import torch

    name = torch.cuda.get_device_name()
    return next((k for k in HBM_BYTES_PER_S if k in name), name)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name()} (+ {os.cpu_count()} CPU cores)"
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if ln.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in, local dir, or gpt2-random (GPT-2 124M, random init)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompts", type=int, default=0, help="prompts for medgen (default 128 on cpu, 256 on cuda)")
    ap.add_argument("--baseline-prompts", type=int, default=8, help="prompts for the pipeline baseline")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=0, help="generate.batch_size (default: medgen's own default, "
                    "or the --config's)")
    ap.add_argument("--config", default="", help="a run config medgen generate starts from (e.g. configs/demo.yaml): "
                    "what a user who starts from it gets")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="medgen's dtype (the pipeline runs fp32)")
    ap.add_argument("--bandwidth", type=float, default=0.0, help="memory bandwidth in bytes/s for the limit (default: by card)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="markdown file to append to ('' = none)")
    args = ap.parse_args()
    args.prompts = args.prompts or (256 if args.device == "cuda" else 128)
    args.load_before = os.getloadavg()[0]  # the 2-core dev machines are shared: say how busy it was
    prompts = make_prompts(args.prompts)
    step = max(1, args.prompts // args.baseline_prompts)
    base_prompts = prompts[::step][:args.baseline_prompts]
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        tmp = Path(tmp)
        path = resolve_model(args.model, tmp)
        model_arg = path if args.model == "gpt2-random" else args.model
        pf = tmp / "prompts.jsonl"
        pf.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
        b_tokens, b_s = baseline(path, base_prompts, args.new_tokens, args.device)
        m_tokens, m_s, cmd = run_medgen(model_arg, pf, tmp / "run", args)
        limit, formula = bandwidth_limit(path, prompts, args)
    b_rate, m_rate = b_tokens / b_s, m_tokens / m_s
    print(f"pipeline, one prompt per call: {b_tokens} new tokens in {b_s:.1f} s = {b_rate:.1f} tokens/s")
    print(f"medgen generate (whole process, batch {args.batch_size}{args.batch_note}): {m_tokens} new tokens in {m_s:.1f} s = {m_rate:.1f} tokens/s")
    print(f"speed-up: {m_rate / b_rate:.1f}x")
    print(f"memory-bandwidth limit: {formula}")
    if args.results:
        _append(Path(args.results), args, b_tokens, b_s, m_tokens, m_s, limit, formula, cmd)


def _portable(text: str) -> str:
    """The command as recorded: this machine's temporary folder as <tmp>, the checkout as ."""
    return re.sub(r"[^\s=]*/bench-generate-[^/\s]+/", "<tmp>/", text).replace(str(ROOT) + "/", "")


def _append(path: Path, args, b_tokens, b_s, m_tokens, m_s, limit, formula, cmd) -> None:
    b_rate, m_rate = b_tokens / b_s, m_tokens / m_s
    envs = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ)
    me = f"{envs} python bench/bench_generate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"\n## generate: medgen vs pipeline, {args.model} on {args.device} ({dt.date.today().isoformat()})\n",
        f"- machine: {machine(args.device)}; load average {args.load_before:.1f} before, {os.getloadavg()[0]:.1f} after",
        f"- command: `{me.strip()}`; medgen ran as `{_portable(' '.join(shlex.quote(c) for c in cmd[1:]))}`",
        f"- greedy, exactly {args.new_tokens} new tokens per prompt in both (min_new_tokens = max_new_tokens), {args.dtype} for medgen, float32 for the pipeline",
        "",
        "| | prompts | new tokens | seconds | new tokens/s |",
        "|---|---|---|---|---|",
        f"| `pipeline(\"text-generation\")`, one prompt per call (load untimed) | {args.baseline_prompts} | {b_tokens} | {b_s:.1f} | {b_rate:.1f} |",
        f"| `medgen generate`, batch {args.batch_size}{args.batch_note}, whole process (start-up and load timed) | {args.prompts} | {m_tokens} | {m_s:.1f} | {m_rate:.1f} |",
        "",
        f"Speed-up **{m_rate / b_rate:.1f}x**. Memory-bandwidth limit on decode: {formula}.",
    ]
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
