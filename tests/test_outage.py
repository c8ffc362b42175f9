"""Object-store outages (issue #14.2): a real moto server behind a fault-injecting TCP proxy (tests/faults.py).

A short outage is ridden out (one warning line, results identical to an undisturbed run); a long one is exit 75
with one line naming the URL, nothing half-published, and a rerun once the store is back gives the same result.
"""
import hashlib
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgen.data.retry import is_transient, retrying
from medgen.errors import StorageUnavailable
from tests.articles import english, row, write_csv
from tests.helpers import REFERENCE_STEPS, REFERENCE_TRAIN, ROOT, TINY, adapter, max_diff
from tests.faults import FaultProxy

# one attempt, fast timeouts: each failed request is seen at once (the defaults are for real stores)
FAST = "{config_kwargs: {connect_timeout: 1, read_timeout: 1, retries: {total_max_attempts: 1}}}"
WARNING = "object store unreachable:"
STEPS = REFERENCE_STEPS


@pytest.fixture
def proxy(s3_server):
    host, port = s3_server["endpoint"].removeprefix("http://").split(":")
    p = FaultProxy((host, int(port)))
    yield p
    p.close()


def _s3(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint},
                             config_kwargs={"connect_timeout": 1, "read_timeout": 1,
                                            "retries": {"total_max_attempts": 1}})


def _start(proxy, *args):
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    return subprocess.Popen([sys.executable, "-m", "medgen", *args, f"data.storage_options={FAST}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _medgen(proxy, *args, code=0):
    proc = _start(proxy, *args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err[-4000:]
    return err


def _no_secrets(err: str, s3_server) -> None:
    assert s3_server["env"]["AWS_SECRET_ACCESS_KEY"] not in err and s3_server["env"]["AWS_ACCESS_KEY_ID"] not in err
    assert "Signature=" not in err


def _one_exit_75_line(err: str, url: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("medgen:")]
    assert len(lines) == 1 and url in lines[0] and "exit 75" in lines[0], err[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- the retry protocol


@pytest.mark.parametrize("mode", ["refuse", "reset", "stall", "busy"])
def test_short_outage_is_ridden_out_with_one_warning(proxy, s3_server, mode, caplog):
    fs = _s3(proxy.url)
    path = f"{s3_server['bucket']}/unit-{mode}"
    fs.pipe_file(path, b"x" * 1000)
    proxy.outage(mode, 1.5)
    with caplog.at_level(logging.INFO, logger="medgen.data.retry"):
        data = retrying(lambda: fs.cat_file(path), "data.shards", f"s3://{path}", 20)
    assert data == b"x" * 1000
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    if mode in ("stall", "busy") and not warnings:
        return  # s3fs's own retries (of a read timeout, of SlowDown) outlasted the outage: medgen saw nothing
    assert len(warnings) == 1 and f"s3://{path}" in warnings[0].getMessage(), caplog.text
    assert "reachable again" in caplog.text


@pytest.mark.parametrize("mode", ["refuse", "reset", "stall", "busy"])
def test_outage_longer_than_the_window_is_storage_unavailable(proxy, s3_server, mode):
    fs = _s3(proxy.url)
    path = f"{s3_server['bucket']}/unit-long-{mode}"
    fs.pipe_file(path, b"y")
    proxy.set(mode)
    # a stalled read fails only after s3fs's own 5 attempts of read_timeout each (~7 s here): one is enough
    window = 0.4 if mode == "stall" else 1.5
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable) as e:
        retrying(lambda: fs.cat_file(path), "data.shards", f"s3://{path}", window)
    assert time.monotonic() - t0 < 12
    assert f"data.shards: s3://{path}: object store unreachable" in str(e.value) and "exit 75" in str(e.value)
    proxy.set("pass")
    assert fs.cat_file(path) == b"y"  # the same client works again once the store is back


def test_the_store_saying_no_is_not_retried(proxy, s3_server):
    fs = _s3(proxy.url)
    calls = []

    def missing():
        calls.append(1)
        return fs.cat_file(f"{s3_server['bucket']}/no-such-key")

    with pytest.raises(FileNotFoundError):
        retrying(missing, "data.shards", "s3://x", 20)
    assert len(calls) == 1
    with pytest.raises(Exception) as e:  # no such bucket
        _s3(proxy.url).cat_file("no-such-bucket-medgen/x")
    assert not is_transient(e.value)
    proxy.set("refuse")
    with pytest.raises(Exception) as e:
        fs.cat_file(f"{s3_server['bucket']}/x")
    assert is_transient(e.value), repr(e.value)


def test_source_read_resumes_at_the_byte_it_reached(proxy, s3_server, caplog):
    from medgen.data.read import open_source

    data = bytes(range(256)) * 4096  # 1 MiB, read in 64 KiB requests
    path = f"{s3_server['bucket']}/unit-source.csv"
    _s3(s3_server["endpoint"]).pipe_file(path, data)
    opts = {"default_block_size": 1 << 16, "client_kwargs": {"endpoint_url": proxy.url},
            "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"total_max_attempts": 1}}}
    reader = open_source(f"s3://{path}", opts, retry_seconds=20)
    proxy.fault_on("GET /" + path, "reset", 1.0, after=5)  # the 5th range request, mid-file
    with caplog.at_level(logging.WARNING, logger="medgen.data.retry"):
        got = b"".join(iter(lambda: reader.read(10_000), b""))
    assert proxy.outages == 1 and len(caplog.records) == 1, caplog.text
    assert got == data and reader.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


def test_outage_lines_carry_no_credentials(caplog):
    err = ConnectionRefusedError('Could not connect to "http://AKIAX:s3cr3t@store:9/b/k?X-Amz-Signature=f00"')

    def refused():
        raise err

    with caplog.at_level(logging.WARNING, logger="medgen.data.retry"), pytest.raises(StorageUnavailable) as e:
        retrying(refused, "data.source", "s3://AKIAX:s3cr3t@bucket/raw.csv?sig=f00", 0.1, sleep=lambda s: None)
    for text in (str(e.value), caplog.text):
        assert "s3://bucket/raw.csv" in text and "http://store:9/b/k" in text
        assert not [secret for secret in ("AKIAX", "s3cr3t", "f00") if secret in text], text


# --------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """40 short articles: cheap to prepare, and 8 small shards that training reads again and again."""
    return write_csv(tmp_path_factory.mktemp("outage") / "articles.csv", [row(i, english(i, 60)) for i in range(40)])


def _prepare_args(source, shards, *extra):
    return ["prepare", *TINY, f"run.dir={source.parent / 'run'}", f"data.source={source}", f"data.shards={shards}", "data.num_shards=8",
            "data.near_dup_threshold=0", *extra]


def _shard_bytes(s3_server, url: str) -> dict[str, str]:
    """sha256 of every published shard (not the manifest and report, which hold times; not the _tmp-<id>/
    prefix an interrupted run could not delete while the store was down)."""
    fs = _s3(s3_server["endpoint"])
    root = url.removeprefix("s3://")
    return {p.removeprefix(root): hashlib.sha256(fs.cat_file(p)).hexdigest()
            for p in fs.find(root) if p.endswith(".parquet") and "/_tmp-" not in p}


@pytest.fixture(scope="module")
def undisturbed(source, s3_server, tmp_path_factory):
    host, port = s3_server["endpoint"].removeprefix("http://").split(":")
    p = FaultProxy((host, int(port)))
    url = f"s3://{s3_server['bucket']}/outage/undisturbed"
    _medgen(p, *_prepare_args(source, url))
    p.close()
    return url, _shard_bytes(s3_server, url)


@pytest.mark.slow  # a few CLI runs each
def test_prepare_rides_out_a_short_outage_during_the_shard_writes(proxy, source, s3_server, undisturbed):
    url = f"s3://{s3_server['bucket']}/outage/short"
    proxy.fault_on("part-", "refuse", 1.5, after=3)  # the third shard upload meets a 1.5 s outage
    err = _medgen(proxy, *_prepare_args(source, url, "data.retry_seconds=30"))
    assert proxy.outages == 1
    assert sum(WARNING in ln for ln in err.splitlines()) == 1, err[-3000:]
    assert _shard_bytes(s3_server, url) == undisturbed[1]
    _no_secrets(err, s3_server)


@pytest.mark.slow  # a few CLI runs each
def test_prepare_outage_longer_than_the_window_exits_75_and_publishes_nothing(proxy, source, s3_server, undisturbed):
    url = f"s3://{s3_server['bucket']}/outage/long"
    proxy.fault_on("part-", "reset", None, after=3)
    err = _medgen(proxy, *_prepare_args(source, url, "data.retry_seconds=2"), code=75)
    _one_exit_75_line(err, url)
    assert sum(WARNING in ln for ln in err.splitlines()) == 1, err[-3000:]
    _no_secrets(err, s3_server)
    fs = _s3(s3_server["endpoint"])
    assert not fs.exists(f"{url.removeprefix('s3://')}/manifest.json")
    proxy.set("pass")  # the store is back: the rerun writes what an undisturbed run writes
    _medgen(proxy, *_prepare_args(source, url, "data.retry_seconds=2"))
    assert _shard_bytes(s3_server, url) == undisturbed[1]


# --------------------------------------------------------------------------- train


def _train_args(run_dir, shards, *extra):
    """The reference run's settings (helpers.REFERENCE_TRAIN), on shards in the object store."""
    return ["train", *TINY, f"run.dir={run_dir}", f"data.shards={shards}", *REFERENCE_TRAIN, *extra]


@pytest.fixture(scope="module")
def reference(undisturbed, s3_server, tmp_path_factory):
    """An undisturbed training run on the s3:// shards, and how many shard reads it made."""
    host, port = s3_server["endpoint"].removeprefix("http://").split(":")
    p = FaultProxy((host, int(port)))
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    _medgen(p, *_train_args(run_dir, undisturbed[0]))
    reads = p.seen("part-")
    p.close()
    assert reads >= 3, f"training read {reads} shards: too few to fault one mid-training"
    return run_dir, reads


@pytest.mark.slow  # a few CLI runs each
def test_train_rides_out_a_short_outage(proxy, tmp_path, s3_server, undisturbed, reference):
    proxy.fault_on("part-", "refuse", 1.5, after=reference[1] - 1)  # a shard read mid-training
    err = _medgen(proxy, *_train_args(tmp_path / "run", undisturbed[0], "data.retry_seconds=30"))
    assert proxy.outages == 1
    assert sum(WARNING in ln for ln in err.splitlines()) == 1, err[-3000:]
    assert max_diff(adapter(tmp_path / "run"), adapter(reference[0])) <= 1e-6
    _no_secrets(err, s3_server)


@pytest.mark.slow  # a few CLI runs each
def test_train_outage_longer_than_the_window_exits_75_and_the_rerun_resumes(proxy, tmp_path, s3_server,
                                                                         undisturbed, reference):
    run_dir = tmp_path / "run"
    proxy.fault_on("part-", "refuse", None, after=reference[1])  # the last shard read of the run
    err = _medgen(proxy, *_train_args(run_dir, undisturbed[0], "data.retry_seconds=2"), code=75)
    _one_exit_75_line(err, undisturbed[0])
    _no_secrets(err, s3_server)
    assert not (run_dir / "adapter").exists()
    done = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert done and done[-1] < STEPS, done
    proxy.set("pass")
    err = _medgen(proxy, *_train_args(run_dir, undisturbed[0], "data.retry_seconds=2"))
    assert f"resuming from {run_dir / 'checkpoints' / f'step-{done[-1]}'}" in err, err[-3000:]
    assert max_diff(adapter(run_dir), adapter(reference[0])) <= 1e-6


# --------------------------------------------------------------------------- on SLURM: requeued, then resumed


@pytest.mark.slurm
@pytest.mark.slow
def test_a_slurm_stage_past_the_window_is_requeued_and_completes_once_the_store_is_back(s3_server, slurm_cluster,
                                                                                        tmp_path):
    from tests.test_secrets import _controller_address
    from tests.test_slurm import _jobs, _job_records, _wait

    host, port = s3_server["endpoint"].removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port)), host=_controller_address(slurm_cluster["conf"]))  # the nodes reach it
    run, url = tmp_path / "run", f"s3://{s3_server['bucket']}/slurm-outage-{tmp_path.name}"
    try:
        proxy.fault_on(".probe", "refuse", None)  # the prepare job's first write: the store is gone from there on
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
        subprocess.run([sys.executable, "-m", "medgen", "run", "--executor", "slurm", *TINY, f"run.dir={run}",
                        f"data.shards={url}", "data.retry_seconds=3", "slurm.stages=[prepare]",
                        f"data.storage_options={FAST}"], cwd=ROOT, env=env, check=True, capture_output=True)
        job = _jobs(run)["stages"]["prepare"]
        log = Path(job["logs"][0])
        deadline = time.time() + 300
        while "handing over to submitit" not in (log.read_text() if log.exists() else ""):
            assert time.time() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(1)
        proxy.set("pass")  # the store is back before the requeued job starts
        states = _wait(run)
    finally:
        proxy.close()
    text = log.read_text()
    assert states["prepare"]["State"] == "COMPLETED", text[-3000:]
    assert re.search(r"object store unreachable for \d+ s .*exit 75.*handing over to submitit to requeue", text)
    runs = _job_records(job["job_id"], "JobID,State", "-X", "--duplicates")
    assert runs == [f"{job['job_id']}|REQUEUED", f"{job['job_id']}|COMPLETED"], runs
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.exists(f"{url}/manifest.json")
    _no_secrets(text, s3_server)
