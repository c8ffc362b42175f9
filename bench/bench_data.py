"""Benchmark `medgen prepare`: MB/s of raw CSV on 1 and 2 workers, per-step CPU cost, memory of the process tree.

    python bench/bench_data.py [--source CSV] [--copies 3] [--workers 1,2]
    python bench/bench_data.py --index-memory 192000 [--datasketch]   # near-dup index memory only

1x is the 500-article sample plus ``copies - 1`` altered copies (other URLs, every third word swapped for a
random word of the same article: neither exact nor near-duplicate detection drops them, checked by rows_kept,
and the text still tokenizes like real text); 10x is ten times that (~106 MB with the defaults: Kaggle-like
rows at scale). Each `medgen prepare` runs in its own process (tiny-gpt2 = the real GPT-2 tokenizer,
configs/tiny.yaml); the process tree (prepare and its workers) is sampled every 0.2 s for its summed RSS and
PSS (PSS shares the pages forked workers have in common with the parent fairly; RSS counts them in each).
Prints a Markdown block for bench/RESULTS.md, with projections for the full Kaggle file.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "medium" / "medium-articles-500.csv"


def altered_copies(src: Path, dst: Path, copies: int) -> int:
    """``src`` followed by ``copies - 1`` altered copies; returns the number of data rows."""
    csv.field_size_limit(sys.maxsize)
    with open(src, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    with open(dst, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, header)
        w.writeheader()
        for k in range(copies):
            for r in rows:
                if k:
                    r = {**r, "url": f"{r['url'].rstrip('/')}-copy{k}", "text": _alter(r["text"], k)}
                w.writerow(r)
    return len(rows) * copies


def _alter(text: str, k: int) -> str:
    """Every third word replaced by a random word of the same article: every word 5-gram changes (so
    near-dedup keeps the copy), while the words stay real (so tokenizing costs what real text costs)."""
    words = text.split(" ")
    rng = random.Random(k)
    return " ".join(words[rng.randrange(len(words))] if i % 3 == 0 else w for i, w in enumerate(words))


def prepare(source: Path, work: Path, workers: int, *overrides: str) -> dict:
    """Run `medgen prepare` in a child process; wall seconds, CPU of the tree, peak tree RSS/PSS and its report."""
    cmd = [sys.executable, "-m", "medgen", "prepare", "--config", "configs/tiny.yaml", "--quiet",
           f"run.dir={work}", f"data.source={source}", f"data.workers={workers}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"rss": 0.0, "pss": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            for k, v in _tree_memory(proc.pid).items():
                peak[k] = max(peak[k], v)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the usage includes the workers it reaped
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare failed on {source}:\n{proc.stderr.read().decode()[-3000:]}")
    report = json.loads((work / "data" / "prepare_report.json").read_text())
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": peak["rss"],
            "pss_mib": peak["pss"], "report": report, "bytes": source.stat().st_size, "workers": workers}


def _tree_memory(pid: int) -> dict[str, float]:
    """Summed RSS and PSS (MiB) of ``pid`` and its descendants now."""
    total = {"rss": 0.0, "pss": 0.0}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                key = line.split(":")[0]
                if key in ("Rss", "Pss"):
                    total[key.lower()] += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # it ended between two reads
    return total


def _load() -> str:
    return open("/proc/loadavg").read().split()[0]


def _rss_mib() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def index_memory(n: int, datasketch_lsh: bool) -> None:
    """Resident memory added by the near-duplicate index after ``n`` distinct articles (random signatures)."""
    import gc

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from medgen.data.filters import MinHashBands, NearDuplicates

    bands = MinHashBands(0.8, 128)
    near = NearDuplicates(bands.bands)
    rng = np.random.default_rng(0)
    lsh = None
    if datasketch_lsh:
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=0.8, num_perm=128)
    gc.collect()
    before, t0 = _rss_mib(), time.perf_counter()
    for i in range(n):
        sig = rng.integers(0, 2**32 - 1, 128, dtype=np.uint32)
        if lsh is None:
            near.check_and_add(bands.band_keys(sig))
        else:
            lsh.insert(i, MinHash(hashvalues=sig, scheme="affine32"))
    gc.collect()
    what = "datasketch MinHashLSH" if lsh else "medgen NearDuplicates"
    print(f"{what}: {n} articles, +{_rss_mib() - before:.0f} MiB resident, {time.perf_counter() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SAMPLE, help="the articles to copy (Kaggle Medium schema)")
    ap.add_argument("--copies", type=int, default=3, help="1x = this many (altered) copies of --source")
    ap.add_argument("--workers", default="1,2", help="data.workers values to compare, the first is the baseline")
    ap.add_argument("--index-memory", type=int, metavar="N", help="only measure the near-dup index for N articles")
    ap.add_argument("--datasketch", action="store_true", help="with --index-memory: datasketch's MinHashLSH instead")
    args = ap.parse_args()
    if args.index_memory:
        return index_memory(args.index_memory, args.datasketch)
    if not args.source.exists():
        raise SystemExit(f"{args.source} not found (the shared Medium sample)")
    counts = [int(w) for w in args.workers.split(",")]
    load_before = _load()
    runs: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        one, ten = tmp / "x1.csv", tmp / "x10.csv"
        n1 = altered_copies(args.source, one, args.copies)
        n10 = altered_copies(args.source, ten, 10 * args.copies)
        for size, src in (("1x", one), ("10x", ten)):
            for w in counts:
                runs[size, w] = r = prepare(src, tmp / f"r{size}-{w}", w)
                assert r["report"]["rows_kept"] == (n1 if size == "1x" else n10), r["report"]["dropped"]
                print(f"{size} workers={w}: {r['bytes'] / 1e6 / r['seconds']:.2f} MB/s", file=sys.stderr)
    _print(args, runs, counts, load_before)


def _print(args, runs: dict, counts: list[int], load_before: str) -> None:
    base, best = counts[0], counts[-1]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"### prepare on {' and '.join(map(str, counts))} workers, {time.strftime('%Y-%m-%d')}\n")
    print(f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}. Command: "
          f"`python bench/bench_data.py --copies {args.copies} --workers {args.workers}` (configs/tiny.yaml). "
          f"Load average before/after: {load_before} / {_load()}.\n")
    print("| run | workers | CSV MB | rows kept | wall s | CPU s (tree) | MB/s (wall) | peak RSS MiB (tree) | "
          "peak PSS MiB (tree) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (size, w), r in runs.items():
        print(f"| {size} | {w} | {r['bytes'] / 1e6:.1f} | {r['report']['rows_kept']} | {r['seconds']:.1f} | "
              f"{r['cpu']:.1f} | {r['bytes'] / 1e6 / r['seconds']:.2f} | {r['rss_mib']:.0f} | {r['pss_mib']:.0f} |")
    speed = {w: runs["10x", w]["bytes"] / 1e6 / runs["10x", w]["seconds"] for w in counts}
    print(f"\n- 10x: **{speed[best]:.2f} MB/s with {best} workers, {speed[best] / speed[base]:.2f}x** the "
          f"{speed[base]:.2f} MB/s of {base} (whole runs, start-up included).")
    for w in counts:
        print(f"- workers={w}: peak PSS 10x / 1x = **{runs['10x', w]['pss_mib'] / runs['1x', w]['pss_mib']:.3f}**, "
              f"RSS {runs['10x', w]['rss_mib'] / runs['1x', w]['rss_mib']:.3f}")
    procs = {w: w if w > 1 else 0 for w in counts}  # workers=1 works in the parent: no worker process
    if procs[best] > procs[base]:
        extra = runs["10x", best]["pss_mib"] - runs["10x", base]["pss_mib"]
        print(f"- memory added per worker process (10x, PSS): {extra / (procs[best] - procs[base]):.0f} MiB "
              f"({best} workers: {extra:.0f} MiB more than {base}, the loaded models shared with the parent)")
    _print_steps(runs["10x", base], runs["10x", best], best)


def _print_steps(one: dict, many: dict, n: int) -> None:
    """Each step's CPU cost per MB (1 worker), and the full-file projection from the measured rates."""
    mb = one["bytes"] / 1e6
    steps = one["report"]["timing"]["cpu_seconds"]
    total = sum(steps.values())
    print("\n| step (10x, 1 worker) | CPU s | CPU s per MB | share |\n|---|---|---|---|")
    for k, v in steps.items():  # prepare's steps, in pipeline order
        print(f"| {k} | {v:.1f} | {v / mb:.3f} | {v / total:.0%} |")
    # With n workers the parent reads, decides, writes and hands chunks over; the workers do the rest. Per MB:
    timing = many["report"]["timing"]
    # before prepare's clock starts the parent only starts up (imports, tokenizer, language model): CPU ~ wall
    startup = many["seconds"] - timing["seconds"]
    parent = timing["parent_cpu_seconds"] / mb
    worker = (many["cpu"] - timing["parent_cpu_seconds"] - startup) / mb
    model = {cores: min(cores / (worker + parent), 1 / parent) for cores in (n, 2, 8, 32)}
    measured = mb / timing["seconds"]
    print(f"\nProjection for the full Kaggle file (~1 GB, ~192k articles). Measured with {n} workers: the workers "
          f"spend {worker:.2f} CPU s per MB, the parent {parent:.3f} (reading, the order-dependent decisions, "
          f"writing, handing chunks over), so the parent alone caps prepare at {1 / parent:.1f} MB/s; start-up "
          f"(imports, tokenizer, language model) {startup:.1f} s. Model: MB/s = min(cores / (worker + parent), "
          f"1 / parent), one worker per core; at {n} cores it gives {model[n]:.2f} MB/s past start-up, measured "
          f"{measured:.2f}.\n")
    print("| cores (= workers) | projected MB/s | projected minutes for 1 GB |\n|---|---|---|")
    for cores in (2, 8, 32):
        print(f"| {cores} | {model[cores]:.1f} | {(startup + 1000 / model[cores]) / 60:.1f} |")


if __name__ == "__main__":
    main()
