"""Benchmark `medgen prepare`: peak memory at 1x and 10x input, and throughput in MB/s of raw CSV.

    python bench/bench_data.py [--source CSV] [--ablation]
    python bench/bench_data.py --index-memory 192000 [--datasketch]   # near-dup index memory only

The 10x input is the 500-article sample plus 9 copies with other URLs and every third word swapped
for another word of the same article, so neither exact nor near-duplicate detection drops the copies
(checked: rows_kept is 10x) and the text still tokenizes like real text. Each
`medgen prepare` runs in its own process (tiny-gpt2 tokenizer, configs/tiny.yaml); its peak RSS comes
from os.wait4, so it covers that process only. A run on a header-only CSV gives the fixed cost (Python,
torch/transformers imports, tokenizer, language model). Prints a Markdown block for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
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
    """Every third word replaced by another word of the same article: every word 5-gram changes (so
    near-dedup keeps the copy), while the words stay real (so tokenizing costs what real text costs)."""
    words = text.split(" ")
    n = len(words)
    return " ".join(words[(i + 7 * k) % n] if i % 3 == 0 else w for i, w in enumerate(words))


def prepare(source: Path, work: Path, *overrides: str) -> dict:
    """Run `medgen prepare` in a child process; wall seconds, peak RSS (MiB) and its report."""
    cmd = [sys.executable, "-m", "medgen", "prepare", "--config", "configs/tiny.yaml", "--quiet",
           f"run.dir={work}", f"data.source={source}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare failed on {source}:\n{proc.stderr.read().decode()[-3000:]}")
    report = json.loads((work / "data" / "prepare_report.json").read_text())
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024,
            "report": report, "bytes": source.stat().st_size}


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
    ap.add_argument("--source", type=Path, default=SAMPLE, help="the 1x input (Kaggle Medium schema)")
    ap.add_argument("--ablation", action="store_true", help="also run 10x without language ID and near-dedup")
    ap.add_argument("--index-memory", type=int, metavar="N", help="only measure the near-dup index for N articles")
    ap.add_argument("--datasketch", action="store_true", help="with --index-memory: datasketch's MinHashLSH instead")
    args = ap.parse_args()
    if args.index_memory:
        return index_memory(args.index_memory, args.datasketch)
    if not args.source.exists():
        raise SystemExit(f"{args.source} not found (the shared Medium sample)")
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        empty = tmp / "empty.csv"
        empty.write_text("title,text,url,authors,timestamp,tags\n")
        ten = tmp / "x10.csv"
        n10 = altered_copies(args.source, ten, 10)
        runs = {"fixed cost (header only)": prepare(empty, tmp / "r0"), "1x": prepare(args.source, tmp / "r1"),
                "10x": prepare(ten, tmp / "r10")}
        if args.ablation:
            runs["10x, languages=[] near_dup_threshold=0"] = prepare(
                ten, tmp / "r10b", "data.languages=[]", "data.near_dup_threshold=0")
    one, tenx, base = runs["1x"], runs["10x"], runs["fixed cost (header only)"]
    assert tenx["report"]["rows_kept"] == 10 * one["report"]["rows_kept"] == n10, tenx["report"]["dropped"]
    steady = (tenx["bytes"] - one["bytes"]) / 1e6 / (tenx["seconds"] - one["seconds"])
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"### prepare, {time.strftime('%Y-%m-%d')}\n")
    print(f"Machine: {cpu}, {os.cpu_count()} cores (shared), Python {platform.python_version()}. "
          f"Command: `python bench/bench_data.py{' --ablation' if args.ablation else ''}` (configs/tiny.yaml).\n")
    print("| run | CSV MB | rows kept | wall s | CPU s | MB/s (wall) | peak RSS MiB | RSS above fixed cost MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['report']['rows_kept']} | {r['seconds']:.1f} | {r['cpu']:.1f} | "
              f"{r['bytes'] / 1e6 / r['seconds']:.2f} | {r['rss_mib']:.0f} | {r['rss_mib'] - base['rss_mib']:.0f} |")
    steady_cpu = (tenx["bytes"] - one["bytes"]) / 1e6 / (tenx["cpu"] - one["cpu"])
    print(f"\nPeak RSS 10x / 1x = {tenx['rss_mib'] / one['rss_mib']:.3f} (acceptance: <= 1.2). Throughput past the "
          f"fixed cost ((10x - 1x) bytes / (10x - 1x) time): {steady:.2f} MB/s of raw CSV by wall clock, "
          f"{steady_cpu:.2f} MB per CPU-second. Load average before/after: {load_before} / {_load()}.")


if __name__ == "__main__":
    main()
