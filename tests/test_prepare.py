"""prepare on the real Medium samples, locally and on a real S3 server; split stability; bad sources."""
import csv
import hashlib
import json
import random
import sys

import pyarrow.parquet as pq
import pytest

from tests.helpers import medgen

NO_META = ["data.url_column=", "data.tags_column=", "data.authors_column=", "data.timestamp_column="]


def _ids_by_split(data_dir):
    out = {}
    for split in ("train", "validation", "test"):
        for f in sorted((data_dir / split).glob("*.parquet")):
            for i in pq.read_table(f, columns=["id"]).column("id").to_pylist():
                out[i] = split
    return out


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_prepare_real_sample_accounts_for_every_row(tmp_path, medium_sample):
    medgen("prepare", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", f"data.source={medium_sample}")
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert report["rows_read"] == 500
    assert report["rows_kept"] + sum(report["dropped"].values()) == 500
    assert report["source_sha256"] == hashlib.sha256(medium_sample.read_bytes()).hexdigest()
    for info in manifest["splits"].values():
        for e in info["shards"]:
            blob = (tmp_path / "data" / e["path"]).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == e["sha256"] and len(blob) == e["bytes"]
            assert pq.read_metadata(tmp_path / "data" / e["path"]).num_rows == e["rows"]
    assert manifest["splits"]["test"]["articles"] > 20
    assert report["cleaned"]["urls"] > 0


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_split_is_stable_across_shard_counts_and_input_order(tmp_path, medium_sample):
    with open(medium_sample, newline="", encoding="utf-8") as f:
        csv.field_size_limit(sys.maxsize)
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    random.Random(7).shuffle(body)
    shuffled = tmp_path / "shuffled.csv"
    with open(shuffled, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header] + body)
    medgen("prepare", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'a'}", f"data.source={medium_sample}",
           "data.num_shards=2", "data.chunk_rows=64")
    medgen("prepare", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'b'}", f"data.source={shuffled}",
           "data.num_shards=5", "data.chunk_rows=1000")
    a, b = _ids_by_split(tmp_path / "a" / "data"), _ids_by_split(tmp_path / "b" / "data")
    assert len(a) > 400 and a == b


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_prepare_tds_with_column_options(tmp_path):
    from tests.helpers import SHARED

    src = SHARED / "tds-articles-1390.csv"
    if not src.exists():
        pytest.skip(f"{src} not found")
    medgen("prepare", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", f"data.source={src}", *NO_META)
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert report["rows_read"] == 1390 and report["rows_kept"] + report["rows_dropped"] == 1390
    assert report["rows_kept"] > 1000


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_missing_text_column_is_one_line_exit_2(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("title,body\nhello,world\n")
    proc = medgen("prepare", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", f"data.source={src}", *NO_META,
                  check=False)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medgen:")]
    assert len(errors) == 1 and "'text'" in errors[0] and "x.csv" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_prepare_train_evaluate_on_s3(tmp_path, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    from medgen.config import DEMO_ARTICLES

    fs.put(DEMO_ARTICLES, "medgen-test/raw/articles.csv")
    shards = "s3://medgen-test/runs/tiny/data"
    common = ["--config", "configs/tiny.yaml", f"run.dir={tmp_path}", f"data.shards={shards}"]
    medgen("prepare", *common, "data.source=s3://medgen-test/raw/articles.csv")
    manifest = json.loads(fs.cat(f"{shards}/manifest.json"))
    assert sum(s["articles"] for s in manifest["splits"].values()) == 49
    assert not fs.glob(f"{shards}/_tmp-*")
    text = fs.cat(f"{shards}/manifest.json").decode() + fs.cat(f"{shards}/prepare_report.json").decode()
    assert "medgen-secret" not in text and "medgen-test/raw" in text
    medgen("train", *common, "train.max_steps=2")
    medgen("evaluate", *common)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["tuned"]["tokens"] == manifest["splits"]["test"]["tokens"]


def test_prepare_real_sample_from_s3_to_s3(tmp_path, s3_server, medium_sample):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(medium_sample), "medgen-test/raw/medium-500.csv")
    shards = "s3://medgen-test/real/data"
    medgen("prepare", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", f"data.shards={shards}",
           "data.source=s3://medgen-test/raw/medium-500.csv")
    report = json.loads(fs.cat(f"{shards}/prepare_report.json"))
    manifest = json.loads(fs.cat(f"{shards}/manifest.json"))
    assert report["rows_read"] == 500 and report["rows_kept"] + report["rows_dropped"] == 500
    assert report["source_sha256"] == hashlib.sha256(medium_sample.read_bytes()).hexdigest()
    assert sum(s["articles"] for s in manifest["splits"].values()) == report["rows_kept"]
    for info in manifest["splits"].values():
        for e in info["shards"]:
            assert hashlib.sha256(fs.cat(f"{shards}/{e['path']}")).hexdigest() == e["sha256"]
