"""prepare end to end on bad input, duplicates, languages, failures and object storage (issue #3)."""
import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medgen.data import split
from tests.articles import FRENCH, GERMAN, HEADER, SPANISH, english, row, write_csv
from tests.helpers import SHARED, TINY, marks_its_tests, medgen, start_moto

NO_META = ["data.url_column=", "data.tags_column=", "data.authors_column=", "data.timestamp_column="]


def _prepare(tmp_path, source, *overrides, check=True, env=None, data=None):
    data = data or tmp_path / "data"
    return medgen("prepare", *TINY, f"run.dir={tmp_path}", f"data.source={source}", f"data.shards={data}", *overrides,
                  check=check, env=env)


def _report(data: Path) -> dict:
    return json.loads((data / "prepare_report.json").read_text())


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medgen:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _ids(data: Path) -> dict[str, str]:
    return {i: s for s in ("train", "validation", "test") for f in sorted((data / s).glob("*.parquet"))
            for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()}


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_malformed_rows_are_counted_and_reported_never_a_crash(tmp_path):
    rows = [row(i) for i in range(6)] + [
        row(10, text=""),                        # missing text
        row(11, timestamp="not a date"),         # kept, timestamp cleared
        row(12, tags="['unclosed"),              # kept, tags cleared
        row(13, text="word " * (2 << 20)),       # a 10 MB article
        row(14) + ["EXTRA"],                     # too many fields
        row(15)[:3],                             # too few fields
    ]
    src = write_csv(tmp_path / "bad.csv", rows)
    with open(src, "ab") as f:
        f.write(b'Bytes,"' + english(16).encode() + b' caf\xe9 \xff",https://m.example/16,[],2020-01-01,[]\n')
        f.write(b'Quoting,"' + english(17).encode() + b'"junk,https://m.example/17,[],2020-01-01,[]\n')
        f.write(b"\n")  # a blank line is not a row
    proc = _prepare(tmp_path, src)
    report = _report(tmp_path / "data")
    assert report["rows_read"] == 14
    assert report["rows_kept"] + report["rows_dropped"] == report["rows_read"]
    assert {k: v for k, v in report["dropped"].items() if v} == {
        "wrong_field_count": 2, "malformed_quoting": 1, "missing_text": 1, "too_long": 1}
    assert report["warnings"] == {"invalid_utf8_replaced": 1, "tags_unparsable_cleared": 1,
                                  "timestamp_unparsable_cleared": 1}
    for reason in report["dropped"]:
        assert reason in proc.stdout  # the printed table lists every reason
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert sum(s["articles"] for s in manifest["splits"].values()) == report["rows_kept"] == 9


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_empty_source_is_an_empty_dataset(tmp_path):
    src = tmp_path / "empty.csv"
    src.write_bytes(b"")
    _prepare(tmp_path, src)
    report = _report(tmp_path / "data")
    assert report["rows_read"] == report["rows_kept"] == report["rows_dropped"] == 0
    assert (tmp_path / "data" / "manifest.json").exists()


def _real_rows(n: int) -> list[list[str]]:
    with open(SHARED / "medium-articles-500.csv", newline="", encoding="utf-8") as f:
        csv.field_size_limit(sys.maxsize)
        reader = csv.DictReader(f)
        return [[r[h] for h in HEADER] for _, r in zip(range(n), reader)]


def _near_copy(r: list[str], i: int) -> list[str]:
    words = r[1].split(" ")
    words[len(words) // 2] = "altered"  # one word: Jaccard of the 5-gram sets stays ~0.99
    return [r[0], " ".join(words), r[2].rstrip("/") + f"-copy-{i}", r[3], r[4], r[5]]


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_near_duplicates_are_dropped_across_splits_and_languages_filtered(tmp_path, medium_sample):
    originals = _real_rows(60)
    copies = [_near_copy(r, i) for i, r in enumerate(originals[:20])]
    exact = [originals[20][0], originals[20][1].upper(), originals[20][2] + "-exact", *originals[20][3:]]
    foreign = [row(100 + i, text=t) for i, t in enumerate((GERMAN, FRENCH, SPANISH))]
    src = write_csv(tmp_path / "dups.csv", originals + copies + [exact] + foreign)
    _prepare(tmp_path, src)
    report = _report(tmp_path / "data")
    assert report["dropped"]["duplicate_near"] == 20
    assert report["dropped"]["duplicate_exact"] == 1
    assert report["dropped"]["wrong_language"] == 3
    assert report["languages_dropped"] == {"de": 1, "fr": 1, "es": 1}
    kept = _ids(tmp_path / "data")
    original_ids = {split.article_id(r[2], "", "") for r in originals}
    assert set(kept) == original_ids  # the first seen of each cluster is kept
    # the index spans all splits: copies that would have landed in another split than their original
    moved = [c for c, o in zip(copies, originals) if split.assign_split(split.article_id(c[2], "", ""), 0.1, 0.1)
             != kept[split.article_id(o[2], "", "")]]
    assert moved, "test data should include copies hashed into another split"


def test_language_filter_and_near_dedup_can_be_turned_off(tmp_path, capsys, monkeypatch):
    from medgen.cli import main

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")  # main() would set it for the rest of the session
    src = write_csv(tmp_path / "mixed.csv", [row(1), row(2, text=GERMAN), row(3, text=english(1))])
    assert main(["prepare", *TINY, f"run.dir={tmp_path}", f"data.source={src}", "data.languages=[]",
                 "data.near_dup_threshold=0"]) == 0
    report = _report(tmp_path / "data")
    assert report["rows_kept"] == 2 and report["dropped"]["duplicate_exact"] == 1
    assert main(["prepare", *TINY, f"run.dir={tmp_path}", f"data.source={src}", "data.languages=[en, xx]"]) == 2
    err = capsys.readouterr().err
    assert "data.languages: unknown language code 'xx'" in err and "Traceback" not in err


def _tree(data: Path) -> dict[str, str]:
    return {str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.rglob("*"))
            if p.is_file()}


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_prepare_failing_midway_leaves_the_previous_dataset_intact(tmp_path, medium_sample):
    tds = SHARED / "tds-articles-1390.csv"
    if not tds.exists():
        pytest.skip(f"{tds} not found")
    data = tmp_path / "data"
    _prepare(tmp_path, medium_sample, "data.num_shards=1")
    before = _tree(data)
    # 1390 good rows (> 512 train rows: shards are being written) and then a quote that never closes
    broken = tmp_path / "broken.csv"
    shutil.copy(tds, broken)
    with open(broken, "a", encoding="utf-8") as f:
        f.write('x.txt,Broken,"this quote never closes\n' + "more,rows,here\n" * 3)
    proc = _prepare(tmp_path, broken, "data.num_shards=1", "data.chunk_rows=100", *NO_META, check=False)
    assert "never closes" in _one_error_line(proc)
    assert _tree(data) == before  # same manifest, report and shards, byte for byte
    assert not list(data.glob("_tmp-*"))
    manifest = json.loads((data / "manifest.json").read_text())
    for info in manifest["splits"].values():
        for e in info["shards"]:
            assert hashlib.sha256((data / e["path"]).read_bytes()).hexdigest() == e["sha256"]
            assert pq.read_metadata(data / e["path"]).num_rows == e["rows"]
    fresh = tmp_path / "fresh"
    _prepare(tmp_path, broken, "data.num_shards=1", *NO_META, check=False, data=fresh)
    assert not fresh.exists() or not any(fresh.rglob("*"))  # never a manifest, never partial shards


# ------------------------------------------------------------------------------------------ object storage


def test_missing_bucket_is_one_line_exit_2(tmp_path, s3_server):
    import s3fs

    src = write_csv(tmp_path / "a.csv", [row(i) for i in range(3)])
    proc = _prepare(tmp_path, "s3://no-such-bucket/raw/a.csv", check=False)
    line = _one_error_line(proc)
    assert "s3://no-such-bucket/raw/a.csv" in line and "check the path" in line
    proc = _prepare(tmp_path, src, check=False, data="s3://no-such-bucket-2/shards")
    line = _one_error_line(proc)
    assert "s3://no-such-bucket-2/shards does not exist" in line and "create it or fix data.shards" in line
    s3fs.S3FileSystem.clear_instance_cache()
    assert "no-such-bucket-2" not in s3fs.S3FileSystem().ls("")  # s3fs.makedirs would have created it
    assert s3_server["env"]["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
@marks_its_tests("s3", "slow")
def s3_auth_server():
    """A moto S3 server that checks credentials (moto's IAM auth after 4 unauthenticated setup calls)."""
    import boto3

    proc, endpoint = start_moto("127.0.0.1", env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        client = lambda svc, key="setup", secret="setup": boto3.client(  # noqa: E731
            svc, endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret)
        iam = client("iam")
        iam.create_user(UserName="medgen")
        key = iam.create_access_key(UserName="medgen")["AccessKey"]
        iam.put_user_policy(UserName="medgen", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        s3 = client("s3", key["AccessKeyId"], key["SecretAccessKey"])
        s3.create_bucket(Bucket="medgen-auth")
        s3.put_object(Bucket="medgen-auth", Key="raw/a.csv", Body=b"title,text\nt,x\n")
        yield {"env": {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                       "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}}
    finally:
        proc.terminate()
        proc.wait(10)


def test_wrong_s3_credentials_are_one_line_exit_2(tmp_path, s3_auth_server):
    wrong = {**s3_auth_server["env"], "AWS_SECRET_ACCESS_KEY": "wrong-secret-4a1b2c"}
    proc = _prepare(tmp_path, "s3://medgen-auth/raw/a.csv", check=False, env=wrong)
    line = _one_error_line(proc)
    assert "access denied to s3://medgen-auth/raw/a.csv" in line and "credentials" in line
    src = write_csv(tmp_path / "a.csv", [row(i) for i in range(3)])
    proc = _prepare(tmp_path, src, check=False, env=wrong, data="s3://medgen-auth/shards")
    line = _one_error_line(proc)
    assert "data.shards: access denied to s3://medgen-auth/shards" in line
    for secret in ("wrong-secret-4a1b2c", s3_auth_server["env"]["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in proc.stdout + proc.stderr
