"""Experiment tracking (medgen/tracking.py) against the real trackers: an MLflow tracking server on loopback and
MLflow's SQLite store; W&B in offline mode in a network namespace with no route, its connect() calls traced.
A run stopped by SIGTERM and rerun is one tracker run with continuous steps equal to train_log.jsonl; a sweep
is a parent run with one child per point carrying its grid values."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from medgen import tracking
from medgen.config import load_config
from medgen.errors import ConfigError
from tests.helpers import REFERENCE_TRAIN, ROOT, TINY, command, env, medgen, start_mlflow

# --------------------------------------------------------------------------- no tracker needed


def test_unknown_trackers_are_named_in_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["tracking.to=[mlflow,neptune]"])
    assert "tracking.to: unknown tracker(s) neptune" in str(e.value)


def test_a_tracking_uri_is_shown_without_its_password():
    assert tracking.shown("https://ann:s3cret@mlflow.example.org:5000/x") == "https://mlflow.example.org:5000/x"
    assert tracking.shown("sqlite:////runs/mlflow.db") == "sqlite:////runs/mlflow.db"


def test_evaluation_metrics_flatten_intervals_and_skip_the_per_tag_breakdown():
    m = {"split": "test", "base": {"perplexity": 9.5, "ci95": [9.0, 10.0], "per_tag": {"a": {"perplexity": 1}},
                                   "model": "tiny"}, "delta": {"ratio": 0.9}}
    assert tracking.evaluation_metrics(m) == {"eval.base.perplexity": 9.5, "eval.base.ci95_lo": 9.0,
                                              "eval.base.ci95_hi": 10.0, "eval.delta.ratio": 0.9}


# --------------------------------------------------------------------------- helpers


def _train_cmd(run: Path, shards: str, *extra: str) -> list[str]:
    return command("train", *TINY, f"run.dir={run}", f"data.shards={shards}", *REFERENCE_TRAIN, *extra)


def _sigterm_after(cmd: list[str], run: Path, steps: int) -> str:
    """Start ``cmd`` and send SIGTERM to its process group once ``steps`` steps are done (SLURM's preemption)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    samples = run / "samples" / "rank-00000.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and (
            not samples.exists() or len(samples.read_text().splitlines()) < steps):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0 and list((run / "checkpoints").glob("step-*")), err[-3000:]
    return err


def _rerun(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _train_log(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every number of train_log.jsonl by key: [(step, value), ...] in step order."""
    out = defaultdict(list)
    for line in (run / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k].append((rec["step"], float(v)))
    return {k: sorted(v) for k, v in out.items()}


# --------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    proc, uri = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield uri
    proc.terminate()
    proc.wait(30)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs_of(client, run: Path) -> list:
    exp = client.get_experiment_by_name("medgen")
    return client.search_runs([exp.experiment_id], f"tags.`medgen.run_dir` = '{run.absolute()}'")


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


@pytest.mark.slow
def test_mlflow_server_run_survives_sigterm_and_holds_every_stage(tmp_path, shards, mlflow_server):
    run = tmp_path / "run"
    cmd = _train_cmd(run, shards, "tracking.to=[mlflow]", f"tracking.mlflow_uri={mlflow_server}")
    _sigterm_after(cmd, run, steps=4)
    err = _rerun(cmd)
    assert "(continued)" in err, err[-3000:]
    for stage in ("evaluate", "generate", "report"):
        medgen(stage, *TINY, f"run.dir={run}", f"data.shards={shards}", "tracking.to=[mlflow]",
               f"tracking.mlflow_uri={mlflow_server}")

    client = _client(mlflow_server)
    runs = _runs_of(client, run)
    assert len(runs) == 1, "a resumed run and its later stages must continue one MLflow run"
    rid = runs[0].info.run_id
    assert json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"] == rid
    expected = _train_log(run)
    for key, points in expected.items():
        held = sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
        assert held == points, key
    assert [s for s, _ in expected["loss"]] == list(range(1, 9))  # continuous across the SIGTERM
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    got = client.get_run(rid).data
    assert got.metrics["eval.tuned.perplexity"] == metrics["tuned"]["perplexity"]
    assert got.metrics["eval.delta.ci95_lo"] == metrics["delta"]["ci95"][0]
    assert got.params["run.dir"] == str(run) and got.params["train.max_steps"] == "8"
    assert client.get_run(rid).info.status == "FINISHED"
    files = _artifacts(client, rid)
    for want in ("report/report.md", "report/report.html", "eval/metrics.json", "generations/generations.jsonl",
                 "config/train/medgen_config.json"):
        assert want in files, files


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_parent_with_a_child_per_point_in_the_default_store(tmp_path):
    sweep_dir = tmp_path / "sweep"
    medgen("sweep", *TINY, f"run.dir={sweep_dir}", "train.max_steps=2", "--grid", "lora.r=2,4",
           "tracking.to=[mlflow]")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # beside the sweep directory, nothing configured
    client = _client(store)
    exp = client.get_experiment_by_name("medgen")
    everything = client.search_runs([exp.experiment_id])
    parents = [r for r in everything if r.data.tags.get("medgen.sweep") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert json.loads(parent.data.params["grid.lora.r"]) == [2, 4]
    children = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["sweep.lora.r"] for r in children) == ["2", "4"]
    assert sorted(r.data.params["lora.r"] for r in children) == ["2", "4"]
    for child in children:
        point = Path(child.data.tags["medgen.run_dir"])
        assert point.parent == sweep_dir.absolute()
        assert sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss")) \
            == _train_log(point)["loss"]
        assert "eval.tuned.perplexity" in child.data.metrics
    assert "report/compare.md" in _artifacts(client, parent.info.run_id)
    assert len(everything) == 3  # the parent holds the sweep's own prepare and comparison


# --------------------------------------------------------------------------- W&B offline


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B run file (.wandb): W&B's LevelDB-style log (a 7-byte header, 32 KiB blocks of
    records: crc32c, length, type, data) of wandb_internal_pb2.Record messages, read here so that no W&B
    service has to run."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def _no_network() -> list[str]:
    """The command prefix that runs a process in a new network namespace (no route at all, loopback down) and
    traces every connect() it and its children make."""
    if shutil.which("unshare") is None or shutil.which("strace") is None or os.geteuid() != 0:
        pytest.fail("this test needs root, unshare and strace (the CI machine has them)")
    return ["unshare", "--net"]


@pytest.mark.slow
def test_wandb_offline_resumes_the_same_run_and_never_touches_the_network(tmp_path, shards):
    run = tmp_path / "run"
    trace = tmp_path / "connect.trace"
    cmd = [*_no_network(), "strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace),
           *_train_cmd(run, shards, "tracking.to=[wandb]")]
    _sigterm_after(cmd, run, steps=4)
    first = trace.read_text()
    _rerun(cmd)
    calls = first + trace.read_text()
    inet = [ln for ln in calls.splitlines() if "AF_INET" in ln]
    assert not inet, f"a network connection was attempted: {inet[:3]}"

    rid = json.loads((run / "tracking.json").read_text())["wandb"]["id"]
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(f"-{rid}") for f in folders), folders
    rows = [r for f in folders for r in _wandb_history(f / f"run-{rid}.wandb")]
    expected = _train_log(run)
    for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
        held = sorted((r["_step"], float(r[key])) for r in rows if key in r)
        assert held == expected[key], key
    assert [s for s, _ in expected["loss"]] == list(range(1, 9))


@pytest.mark.slow
def test_a_tracking_server_that_does_not_answer_stops_the_stage_in_one_line_before_any_work(tmp_path, shards):
    from tests.helpers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    proc = medgen("train", *TINY, f"run.dir={tmp_path / 'run'}", f"data.shards={shards}", "tracking.to=[mlflow]",
                  f"tracking.mlflow_uri={uri}", check=False)
    assert proc.returncode != 0 and time.time() - t0 < 120
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("medgen: error: tracking: cannot open an MLflow run in " + uri), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
