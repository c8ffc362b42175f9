"""Training-stream throughput: tokens/s that medgen's PackedStream delivers from local shards and from
an S3-protocol server (moto on 127.0.0.1), one process, blocks of --block tokens collated into batches.

    python bench/bench_loader.py            # prepares the real 500-article sample, then measures both
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT.parent / "shared" / "data" / "medium" / "medium-articles-500.csv"


def measure(url: str, storage_options: dict, block: int, batch: int, seconds: float) -> float:
    from medgen.data.shards import read_manifest
    from medgen.data.stream import PackedStream, collate

    manifest = read_manifest(url, storage_options)
    ds = PackedStream(url, manifest, storage_options, block, 50256, "wrapped", 1, 0, 1)
    it = iter(ds)
    next(it)  # opens the first shard
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        collate(list(itertools.islice(it, batch)))
        tokens += block * batch
    return tokens / (time.perf_counter() - t0)


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
        subprocess.run(common, cwd=ROOT, check=True)
        subprocess.run(common + ["data.shards=s3://bench/data"], cwd=ROOT, check=True)
        res = {"block": args.block, "batch": args.batch,
               "local_tokens_per_s": measure(str(work / "data"), {}, args.block, args.batch, args.seconds),
               "s3_tokens_per_s": measure("s3://bench/data", {}, args.block, args.batch, args.seconds)}
    finally:
        proc.terminate()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
