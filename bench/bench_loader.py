"""Training-stream throughput: tokens/s that medgen's PackedStream delivers from local shards and from
an S3-protocol server (moto on 127.0.0.1), one process, blocks of --block tokens collated into batches.

Each source is measured with the real loader (every shard checked against the manifest's size and
SHA-256 before its rows are read) and, in the same run, with the reader as it was before that check
(row groups straight from the file, unchecked), alternating --rounds times; the median of each and
their ratio are printed, per wall-clock second and per CPU second of this process (the latter
barely moves when other jobs share the machine).

    python bench/bench_loader.py            # prepares the real 500-article sample, then measures both
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT.parent / "shared" / "data" / "medium" / "medium-articles-500.csv"


def unverified(shard, storage_options: dict, retry_seconds: float = 0):
    """The shard reader before the integrity check: row groups read straight from the file, unchecked."""
    import pyarrow.parquet as pq

    from medgen.data.shards import filesystem

    fs, path = filesystem(shard.url, storage_options)
    return pq.ParquetFile(fs.open(path, "rb"))


def measure(url: str, storage_options: dict, block: int, batch: int, seconds: float,
            verify: bool = True) -> tuple[float, float, float]:
    """(tokens/s, tokens per CPU second, share of the CPU time spent opening shards: for the checked
    reader that is reading the whole shard, hashing it and parsing its footer)"""
    from medgen.data import shards, stream

    opening = [0.0]

    def timed(*args, **kwargs):
        c0 = time.process_time()
        try:
            return (shards.open_shard if verify else unverified)(*args, **kwargs)
        finally:
            opening[0] += time.process_time() - c0

    stream.open_shard = timed  # the one place stream.iter_shard opens a shard
    try:
        c0 = time.process_time()
        wall, per_cpu = _measure(url, storage_options, block, batch, seconds)
        return wall, per_cpu, opening[0] / (time.process_time() - c0)
    finally:
        stream.open_shard = shards.open_shard


def _measure(url: str, storage_options: dict, block: int, batch: int, seconds: float) -> tuple[float, float]:
    """(tokens per second, tokens per CPU second of this process: less sensitive to other jobs on the machine)"""
    from medgen.data.shards import read_manifest
    from medgen.data.stream import PackedStream, collate

    manifest = read_manifest(url, storage_options)
    ds = PackedStream(url, manifest, storage_options, block, 50256, "wrapped", 1, 0, 1)
    it = iter(ds)
    next(it)  # opens the first shard
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        collate(list(itertools.islice(it, batch)))
        tokens += block * batch
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--sample", type=Path, default=SAMPLE)
    ap.add_argument("--rounds", type=int, default=7,
                    help="measurements per source and reader, alternating checked / unchecked (median reported)")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    proc, endpoint = moto()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    try:
        import s3fs

        s3fs.S3FileSystem().mkdir("bench")
        common = [sys.executable, "-m", "medgen", "prepare", "--config", "configs/tiny.yaml", "-q",
                  f"run.dir={work}", f"data.source={args.sample}", "data.num_shards=1"]
        subprocess.run(common, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(common + ["data.shards=s3://bench/data"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        res: dict = {"block": args.block, "batch": args.batch, "seconds": args.seconds, "rounds": args.rounds}
        for name, url in (("local", str(work / "data")), ("s3", "s3://bench/data")):
            runs: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
            for r in range(args.rounds):
                for verify in ((True, False) if r % 2 == 0 else (False, True)):
                    runs[verify].append(measure(url, {}, args.block, args.batch, args.seconds, verify))
            wall = {v: statistics.median(x[0] for x in runs[v]) for v in runs}
            cpu = {v: statistics.median(x[1] for x in runs[v]) for v in runs}
            res[name] = {
                "tokens_per_s": round(wall[True]), "unchecked_tokens_per_s": round(wall[False]),
                "checked_over_unchecked": round(wall[True] / wall[False], 3),
                "tokens_per_cpu_s": round(cpu[True]), "unchecked_tokens_per_cpu_s": round(cpu[False]),
                "cpu_checked_over_unchecked": round(cpu[True] / cpu[False], 3),
                "open_share_checked": round(statistics.median(x[2] for x in runs[True]), 4),
                "open_share_unchecked": round(statistics.median(x[2] for x in runs[False]), 4),
                "rounds_tokens_per_s": {"checked": [round(x[0]) for x in runs[True]],
                                        "unchecked": [round(x[0]) for x in runs[False]]},
            }
    finally:
        proc.terminate()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
