"""Evaluation throughput: medgen's scorer against the loop of the Hugging Face perplexity guide.

    python bench/bench_eval.py                      # smollm2-135m, 6 real articles, context 512, stride 256
    python bench/bench_eval.py --device cuda --articles 32 --batch-size 32   # on a GPU

Both sides score the same articles as ``[sep] + tokens`` with the same sliding windows, on the same
model object, and must agree within 1e-6 relative. The baseline is the guide's loop
(https://huggingface.co/docs/transformers/perplexity): batch 1, labels = input ids with -100 everywhere
but the new targets, ``model(input_ids, labels=labels).loss * trg_len``. One difference, so that the two
compute the same number: the guide starts a window every ``stride`` tokens and lets the last one run
short; here every window ends ``stride`` tokens after the previous one and starts ``context`` tokens
before its end (medgen's windows), so the last targets also get a full context.

Articles: the test split of the real Medium sample (``../shared/data/medium/medium-articles-500.csv``,
read at run time, never copied), prepared with ``medgen prepare`` into a temporary directory.
Runs alternate (baseline, medgen, baseline, ...) so that load from other processes hits both alike;
the best of ``--repeats`` is reported. Appends a section to bench/RESULTS.md unless --no-record.

    python bench/bench_eval.py --tuned              # base vs tuned (adapter merged / not merged), medgen's scorer

``--tuned`` measures what evaluate's tuned pass costs against its base pass: a LoRA adapter with medgen's
defaults (r 16, alpha 32, the architecture's default targets; random non-zero weights, seed 0, so it is
not a no-op) is saved, then the same articles are scored by the base model, by the tuned model as
``medgen evaluate`` loads it (``models.attach_adapter``: merged when the merged logits match within
``eval.merge_tolerance``) and by the tuned model unmerged (``eval.merge_tolerance=0``, what evaluate did
before), alternating. Goal: tuned within 5% of base tokens/s.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT.parent / "shared" / "data" / "medium" / "medium-articles-500.csv"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))  # this checkout's medgen, whatever the venv's editable install points at
from medgen.config import EvalConfig  # noqa: E402 (this checkout's medgen)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model.name_or_path (built-in, directory or hub id)")
    p.add_argument("--csv", default=str(DEFAULT_CSV), help="real Medium articles CSV (Kaggle schema)")
    p.add_argument("--articles", type=int, default=6, help="test-split articles to score (manifest order)")
    # medgen's own defaults: what a user who changes nothing gets is what is measured
    p.add_argument("--context", type=int, default=EvalConfig().context)
    p.add_argument("--stride", type=int, default=EvalConfig().stride)
    p.add_argument("--batch-size", type=int, default=EvalConfig().batch_size, help="medgen's windows per forward pass")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the best is reported")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = the cores this process may use)")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--tuned", action="store_true", help="base vs tuned (merged, unmerged) instead of guide vs medgen")
    return p.parse_args(argv)


def prepare(csv: str, model: str, workdir: Path) -> Path:
    """``medgen prepare`` the real sample into workdir/data (the CLI, as a user runs it)."""
    cmd = [sys.executable, "-m", "medgen", "prepare", "-q",
           f"run.dir={workdir}", f"data.source={csv}", f"model.name_or_path={model}", "data.num_shards=1"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return workdir / "data"


def load(shards_dir: Path, n: int) -> list[dict]:
    from medgen.data import shards, stream

    manifest = shards.read_manifest(str(shards_dir), {})
    return stream.load_articles(str(shards_dir), manifest, {}, "test")[:n]


def guide_loop(model, articles, sep, context, stride, device) -> tuple[float, int]:
    """The HF perplexity guide's loop, batch 1, on medgen's windows (see the module docstring)."""
    import torch

    nll, count = 0.0, 0
    for a in articles:
        seq = torch.tensor([[sep] + list(a["input_ids"])])
        length = seq.shape[1]
        prev_end, end = 1, min(context, length)
        while prev_end < length:
            trg_len = end - prev_end
            input_ids = seq[:, max(0, end - context):end].to(device)
            labels = input_ids.clone()
            labels[:, :-trg_len] = -100
            with torch.no_grad():
                loss = model(input_ids, labels=labels).loss
            nll += loss.item() * trg_len
            count += trg_len
            prev_end, end = end, min(end + stride, length)
    return nll, count


def medgen_score(model, articles, sep, context, stride, batch_size, device) -> tuple[float, int]:
    from medgen.evaluate import score

    res = score(model, articles, sep, context, stride, batch_size, device, "bench")
    return math.fsum(r[0] for r in res), sum(r[1] for r in res)


def timed(fn, device) -> tuple[tuple[float, int], tuple[float, float]]:
    """The result, (wall seconds, CPU seconds of this process). On a CPU shared with other jobs the CPU
    time of a 1-thread run is the steadier measure of work; wall time is what a user waits."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t0, time.process_time() - c0)


def machine(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from medgen import models

    if not Path(args.csv).exists():
        print(f"bench_eval: {args.csv} not found (the real Medium sample lives in ../shared/data/medium)")
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        articles = load(prepare(args.csv, args.model, Path(tmp)), args.articles)
    tok = models.load_tokenizer(args.model)
    if args.tuned:
        return tuned_vs_base(args, articles, tok, device)
    model = models.load_model(args.model).to(device).eval()
    sep, c, s = tok.eos_token_id, args.context, args.stride
    runs = {"guide": [], "medgen": []}
    values = {}
    loadavg = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        values["guide"], t = timed(lambda: guide_loop(model, articles, sep, c, s, device), device)
        runs["guide"].append(t)
        values["medgen"], t = timed(lambda: medgen_score(model, articles, sep, c, s, args.batch_size, device), device)
        runs["medgen"].append(t)
    loadavg.append(os.getloadavg()[0])
    _publish(args, summarise(args, articles, values, runs, machine(device), loadavg))
    return 0 if report_ok(values) else 1


def random_adapter(model_name: str, target: Path) -> None:
    """A LoRA adapter with medgen's defaults and random non-zero weights, saved as train saves one."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medgen import models
    from medgen.config import LoraConfig as Lora

    model = models.load_model(model_name)
    targets, fan_in_fan_out = models.lora_targets(model, [])
    torch.manual_seed(0)
    cfg = LoraConfig(r=Lora().r, lora_alpha=Lora().alpha, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(str(target))


def tuned_vs_base(args, articles, tok, device) -> int:
    from peft import PeftModel

    from medgen import models
    from medgen.config import EvalConfig

    sep, c, s = tok.eos_token_id, args.context, args.stride
    with tempfile.TemporaryDirectory(prefix="bench-eval-adapter-") as tmp:
        random_adapter(args.model, Path(tmp))
        loaded = {
            "base": models.load_model(args.model),
            "tuned, merged": models.attach_adapter(models.load_model(args.model), tmp, tok, EvalConfig().merge_tolerance,
                                                   "eval.merge_tolerance"),
            "tuned, not merged": (PeftModel.from_pretrained(models.load_model(args.model), tmp), False, float("nan")),
        }
    merged, diff = loaded["tuned, merged"][1:]
    models_ = {k: (v if k == "base" else v[0]).to(device).eval() for k, v in loaded.items()}
    runs = {k: [] for k in models_}
    values = {}
    loadavg = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for k, m in models_.items():
            values[k], t = timed(lambda: medgen_score(m, articles, sep, c, s, args.batch_size, device), device)
            runs[k].append(t)
    loadavg.append(os.getloadavg()[0])
    tokens = values["base"][1]
    ppl, best, best_cpu, cmd = _outcome(values, runs)
    rel = abs(ppl["tuned, merged"] - ppl["tuned, not merged"]) / ppl["tuned, not merged"]
    ratio = best["base"] / best["tuned, merged"]
    lines = [
        f"## bench_eval --tuned — {datetime.date.today().isoformat()}",
        "",
        f"- machine: {machine(device)} (device `{args.device}`, {os_threads()} torch threads); "
        f"1-min load average {loadavg[0]:.1f} at start, {loadavg[1]:.1f} at end",
        f"- command: `{cmd.strip()}`",
        f"- model `{args.model}` + a random LoRA adapter with medgen's defaults, {len(articles)} test articles of "
        f"`{Path(args.csv).name}`, {tokens} predicted tokens, context {args.context}, stride {args.stride}, "
        f"batch {args.batch_size}, best of {args.repeats}",
        f"- merged: {merged} (relative logit difference {diff:.1e}); tuned perplexity merged {ppl['tuned, merged']:.6f}, "
        f"not merged {ppl['tuned, not merged']:.6f} (relative difference {rel:.1e}); base {ppl['base']:.6f}",
        "",
        "| model | best wall s | tokens/s (wall) | vs base | best CPU s | runs (wall/CPU s) |",
        "|---|---|---|---|---|---|",
        *[f"| {k} | {best[k]:.2f} | {tokens / best[k]:.1f} | {best['base'] / best[k]:.3f} | {best_cpu[k]:.2f} | "
          f"{', '.join(f'{w:.1f}/{c_:.1f}' for w, c_ in runs[k])} |" for k in runs],
        "",
        f"Tuned (as evaluate scores it) at **{ratio:.3f}x** the base model's tokens/s (goal ≥ 0.95); "
        f"unmerged, as before: {best['base'] / best['tuned, not merged']:.3f}x.",
        "",
    ]
    _publish(args, "\n".join(lines))
    return 0 if merged and rel < 1e-5 else 1


def _outcome(values, runs) -> tuple[dict, dict, dict, str]:
    """Perplexity per side, its best wall and CPU seconds, and the command that measured them."""
    ppl = {k: math.exp(v[0] / v[1]) for k, v in values.items()}
    best = {k: min(t[0] for t in v) for k, v in runs.items()}
    best_cpu = {k: min(t[1] for t in v) for k, v in runs.items()}
    cmd = "python bench/bench_eval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return ppl, best, best_cpu, cmd


def _publish(args, report: str) -> None:
    print(report)
    if not args.no_record:
        with open(args.results, "a") as f:
            f.write(report + "\n")


def report_ok(values) -> bool:
    (g_nll, g_n), (m_nll, m_n) = values["guide"], values["medgen"]
    return g_n == m_n and math.isclose(math.exp(g_nll / g_n), math.exp(m_nll / m_n), rel_tol=1e-6)


def summarise(args, articles, values, runs, where: str, load: list[float]) -> str:
    tokens = values["medgen"][1]
    ppl, best, best_cpu, cmd = _outcome(values, runs)
    tps = {k: tokens / best[k] for k in best}
    rel = abs(ppl["medgen"] - ppl["guide"]) / ppl["guide"]
    lines = [
        f"## bench_eval — {datetime.date.today().isoformat()}",
        "",
        f"- machine: {where} (device `{args.device}`, {os_threads()} torch threads); "
        f"1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end",
        f"- command: `{cmd.strip()}`",
        f"- model `{args.model}`, {len(articles)} test articles of `{Path(args.csv).name}`, {tokens} predicted tokens, "
        f"context {args.context}, stride {args.stride}, medgen batch {args.batch_size}, best of {args.repeats}",
        f"- perplexity: guide {ppl['guide']:.6f}, medgen {ppl['medgen']:.6f} (relative difference {rel:.1e}, "
        f"{'OK' if report_ok(values) else 'MISMATCH'} at 1e-6)",
        "",
        "| loop | best wall s | tokens/s (wall) | best CPU s | tokens per CPU s | runs (wall/CPU s) |",
        "|---|---|---|---|---|---|",
        *[f"| {k} | {best[k]:.2f} | {tps[k]:.1f} | {best_cpu[k]:.2f} | {tokens / best_cpu[k]:.1f} | "
          f"{', '.join(f'{w:.1f}/{c:.1f}' for w, c in runs[k])} |" for k in runs],
        "",
        f"Speed-up: **{tps['medgen'] / tps['guide']:.2f}x** tokens/s (wall), "
        f"{best_cpu['guide'] / best_cpu['medgen']:.2f}x per CPU second.",
        "",
    ]
    return "\n".join(lines)


def os_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    raise SystemExit(main())
