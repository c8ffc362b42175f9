"""Long runs: a stuck rank is found, reported and the run resumed (medgen/watchdog.py); a run resumes on another
number of processes with its data order and global batch (medgen/elastic.py). Real TRL on gloo, 2 processes."""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, adapter, env, launched, max_diff

pytestmark = pytest.mark.slow
# the shipped defaults for the shape of the run (no train.data_streams, the tiny config's batch), LoRA dropout 0
# (its masks are drawn per process: docs/reliability.md)
STEPS = ("train.max_steps=8", "train.save_steps=2", "train.warmup_steps=2", "lora.dropout=0")
HANG = ("run.hang_timeout=20", "data.retry_seconds=5")  # the watchdog, lowered for the test


def _cmd(nproc: int, run_dir: Path, shards: str, *extra: str) -> list[str]:
    return launched(nproc, "train", *TINY, f"run.dir={run_dir}", f"data.shards={shards}", *STEPS, *extra)


def _run(nproc: int, run_dir: Path, shards: str, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(nproc, run_dir, shards, *extra), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _steps_done(run_dir: Path) -> int:
    f = run_dir / "samples" / "rank-00000.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shards):
    """The same settings run through on 1 and on 2 processes (each its own global batch: batch x processes)."""
    out = {}
    for n in (1, 2):
        out[n] = tmp_path_factory.mktemp("uninterrupted") / f"p{n}"
        _run(n, out[n], shards)
    return out


def _stop_with_sigterm(nproc: int, run_dir: Path, shards: str) -> None:
    """Start the run and send SIGTERM to all its processes after step 4 (as SLURM does on preemption)."""
    proc = subprocess.Popen(_cmd(nproc, run_dir, shards), cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and _steps_done(run_dir) < 4:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0 and not (run_dir / "adapter").exists(), err[-3000:]
    assert list((run_dir / "checkpoints").glob("step-*")), err[-3000:]


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_processes(tmp_path, shards, uninterrupted, first, then):
    run = tmp_path / "run"
    _stop_with_sigterm(first, run, shards)
    err = _run(then, run, shards).stderr
    assert f"resuming a run checkpointed on {first} process" in err and "sequences per step kept" in err, err[-3000:]
    assert max_diff(adapter(run), adapter(uninterrupted[first])) <= 1e-5
    record = json.loads((run / "adapter" / "medgen_config.json").read_text())
    assert record["resolved"]["world_size"] == then


def test_what_cannot_be_kept_is_refused_in_one_line(tmp_path, shards):
    """3 processes cannot share the 2 data streams a run started with."""
    run = tmp_path / "run"
    _stop_with_sigterm(1, run, shards)
    proc = subprocess.run(_cmd(3, run, shards), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "reads 2 data streams, which 3 processes cannot share (each reads whole streams): resume it on 1, 2 " \
           "processes" in proc.stderr, proc.stderr[-3000:]


def _rank_processes(run_dir: Path, shards: str, *extra: str) -> list[subprocess.Popen]:
    """Two ranks as SLURM starts them: one process each, no launcher above them."""
    port = str(random.randint(20000, 40000))
    procs = []
    for rank in range(2):
        rank_env = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                       LOCAL_WORLD_SIZE="2")
        log = open(run_dir.parent / f"rank-{rank}.log", "w")
        procs.append(subprocess.Popen(_cmd(1, run_dir, shards, *extra), cwd=ROOT, env=rank_env,
                                      stdout=subprocess.DEVNULL, stderr=log))
    return procs


def test_a_stopped_rank_is_reported_and_the_run_resumes(tmp_path, shards, uninterrupted):
    run = tmp_path / "run"
    procs = _rank_processes(run, shards, *HANG)
    try:
        deadline = time.time() + 600
        while not (run / "checkpoints" / "step-4").exists():
            assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "rank-0.log").read_text()[-3000:]
            time.sleep(0.02)
        os.kill(procs[1].pid, signal.SIGSTOP)  # a frozen rank: no exit, no error, nothing logged
        t0 = time.time()
        code = procs[0].wait(timeout=20 + 60)
        waited = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    log0 = (tmp_path / "rank-0.log").read_text()
    assert code == 75, log0[-3000:]  # try again: SLURM requeues it, a user reruns it
    report = json.loads((run / "hang" / "train.json").read_text())
    states = {r["rank"]: r["state"] for r in report["ranks"]}
    assert states == {0: "waiting", 1: "stopped responding"} and report["reporter"] == 0, report
    assert report["timeout_setting"] == "run.hang_timeout" and report["step"] >= 4
    stacks = (run / "hang" / "train-rank-00000-stacks.txt").read_text()
    assert "medgen-watchdog" not in stacks and "Thread" in stacks and "train.py" in stacks  # where rank 0 waited
    assert "rank 1 on" in log0 and "stopped responding" in log0 and str(run / "hang" / "train.json") in log0
    assert waited < 20 + 30
    assert not (run / "adapter").exists()
    # the rerun resumes from the last complete checkpoint and ends where the uninterrupted run did
    _run(2, run, shards, *HANG)
    assert max_diff(adapter(run), adapter(uninterrupted[2])) <= 1e-5



def _rates(run_dir: Path) -> dict[int, float]:
    """The learning rate each step trained at, from the train log."""
    rows = [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["learning_rate"] for r in rows if "loss" in r}


def _blocks(run_dir: Path) -> list[str]:
    return (run_dir / "samples" / "rank-00000.jsonl").read_text().splitlines()


def test_a_finished_run_extended_trains_on_the_schedule_configured_now(tmp_path, shards, uninterrupted):
    """train.max_steps raised after a run finished (checkpointing only at the end, the default): it resumes from its
    last step, and steps 5-8 train on the blocks and at the rates of a run configured for 8 steps from the start
    (the Trainer alone would train step 5 at the 4-step cosine's last rate, 0, and keep the old peak rates)."""
    run = tmp_path / "run"
    _run(1, run, shards, "train.max_steps=4", "train.save_steps=0")
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-4"]
    err = _run(1, run, shards, "train.save_steps=0").stderr
    assert f"resuming from {run / 'checkpoints' / 'step-4'}" in err, err[-3000:]
    assert "resuming at step 4 with max_steps 4 -> 8: steps 5-8 follow the cosine schedule of 8 steps" in err
    straight, extended = _rates(uninterrupted[1]), _rates(run)
    assert [extended[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]
    assert extended[4] != straight[4]  # the first 4 steps did follow a 4-step schedule
    assert _blocks(run)[4:] == _blocks(uninterrupted[1])[4:]  # the data stream goes on where it stopped
    # started again once finished: nothing trained, the same adapter saved (the same fingerprint: what
    # evaluate and generate check their outputs against)
    fingerprint = lambda: json.loads((run / "adapter" / "medgen_config.json").read_text())["resolved"][  # noqa: E731
        "adapter_fingerprint"]
    before = fingerprint()
    err = _run(1, run, shards, "train.save_steps=0").stderr
    assert "the run already trained its 8 steps: nothing left to train" in err and fingerprint() == before


def test_a_changed_learning_rate_applies_from_the_first_resumed_step(tmp_path, shards):
    """Resumed at rate 0: no step after the checkpoint moves a weight (the checkpoint's optimizer alone would train
    the first resumed step at the old rate)."""
    run = tmp_path / "run"
    _run(1, run, shards, "train.max_steps=4", "train.lr_scheduler=constant")
    before = adapter(run)
    err = _run(1, run, shards, "train.max_steps=6", "train.lr_scheduler=constant", "train.learning_rate=0").stderr
    assert "max_steps 4 -> 6, learning_rate 0.001 -> 0.0" in err, err[-3000:]
    assert max_diff(adapter(run), before) == 0
    rates = _rates(run)
    assert rates[4] == 0.001 and rates[5] == rates[6] == 0
    # what the checkpoint holds cannot change: one line before any model loads, the run left as it was
    proc = subprocess.run(_cmd(1, run, shards, "train.max_steps=9", "lora.r=8"), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"medgen: error: train: {run / 'checkpoints' / 'step-6'} was trained with other settings (lora.r 16 -> 8), "
        f"which fix what the checkpoint holds: set them back to resume it, or use another run.dir (or delete "
        f"{run / 'checkpoints'}) to start over"), proc.stderr[-3000:]
