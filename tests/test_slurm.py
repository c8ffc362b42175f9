"""The SLURM executor on a real two-node cluster (slurm/cluster.sh up --nodes 2: each node its own network and
UTS namespace, fake GPUs through GRES): sbatch, srun, sacct and scontrol are the real ones, the jobs run the
real stages on tiny-gpt2. The chain across two nodes against --executor local, a GPU-shaped profile, a lost
node, preemption + requeue + exact resume, a failing stage, two clusters side by side, and what reaches an
sbatch script."""
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from medgen import allocator, config
from medgen.errors import ConfigError, UserError
from medgen.launch import slurm
from tests.helpers import ROOT, TINY, command, local_cluster, medgen
from tests.helpers import adapter, max_diff
from tests.test_progress import progress_lines
from tests.test_train import _samples

STEPS = 12
# Local (1 process, batch 4) and SLURM (2 tasks on 2 nodes, batch 2) see the same global batches: data_streams=2 fixes
# the data order whatever the process count, and dropout 0 takes the per-rank dropout RNG out. What is left
# is the order of float sums (DDP averages two half-batch gradients): adapters agree to ~1e-7, asserted 1e-5.
COMMON = ["--config", "configs/tiny.yaml", f"train.max_steps={STEPS}", "train.data_streams=2", "lora.dropout=0",
          "data.num_shards=4"]  # 4 shards: the GPU-shaped profile trains on 4 ranks from the same data
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "?"}


def _jobs(run: Path) -> dict:
    return json.loads((run / "slurm" / "jobs.json").read_text())


def _sacct(run: Path, *extra: str, fields: str = "JobID,State,Start,End", conf: str | None = None) -> list[dict]:
    info = _jobs(run)
    ids = ",".join(s["job_id"] for s in info["stages"].values())
    env = {**os.environ, **({"SLURM_CONF": conf} if conf else {})}
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", info["submitted"], "-o", fields, "-j", ids, *extra],
                         capture_output=True, text=True, check=True, env=env).stdout
    return [dict(zip(fields.split(","), ln.split("|"))) for ln in out.splitlines()]


def _job_records(job: str, fields: str, *extra: str) -> list[str]:
    """sacct's records of one job or step, fields separated by '|'."""
    return subprocess.run(["sacct", "-n", "-P", "-o", fields, "-j", job, *extra], capture_output=True, text=True,
                          check=True).stdout.split()


def _assert_rerun_skipped_the_first_step_id(job_id: str) -> None:
    # the rerun's stage step is <job>.1 (after one short step .0): a signal still queued in slurmctld for the
    # first run's step <job>.0 cannot reach it
    steps = _job_records(job_id, "JobID,State", "--duplicates")
    assert steps[-2:] == [f"{job_id}.0|COMPLETED", f"{job_id}.1|COMPLETED"], steps


def _wait(run: Path, timeout: float = 900, conf: str | None = None) -> dict[str, dict]:
    """Stage -> its sacct record, once every stage has finished (sacct lags 1-2 s behind squeue)."""
    stages = _jobs(run)["stages"]
    deadline = time.time() + timeout
    while True:
        recs = {r["JobID"]: r for r in _sacct(run, conf=conf, fields="JobID,State,Start,End,NodeList,Cluster")}
        by_stage = {k: recs.get(s["job_id"], {"State": "?"}) for k, s in stages.items()}
        env = {**os.environ, **({"SLURM_CONF": conf} if conf else {})}
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(s["job_id"] for s in stages.values())],
                                capture_output=True, text=True, env=env)
        # a requeued job is queued again while sacct still shows how its last run ended (NODE_FAIL)
        if not queued.stdout.split() and all(r["State"].split()[0] not in ACTIVE for r in by_stage.values()):
            return by_stage
        if time.time() > deadline:
            pytest.fail(f"chain not finished after {timeout} s:\n{medgen('status', str(run), check=False).stdout}")
        time.sleep(2)


def _close(a, b, rel: float) -> bool:
    """Nested metrics equal: numbers to ``rel``, everything else exactly."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=rel)
    return a == b


def _outputs(run: Path) -> set[str]:
    """Every file of the output contract. Left out, as they differ by design with the process layout: the
    per-rank sample logs, placements, generation parts and checkpoint RNG/stream states, tensorboard event files
    (host/pid/time in the name), and SLURM's own folder."""
    skip = re.compile(r"^(slurm/|ranks/|samples/rank-|generations/(base-)?part-|tensorboard/events|"
                      r"checkpoints/step-\d+/(rng_state|stream-rank-))")
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not skip.match(str(p.relative_to(run)))}


def _wait_for_progress(run: Path, steps: int = 2, timeout: float = 600) -> None:
    """Training is past its first steps: the signal handlers are installed."""
    progress, deadline = run / "samples" / "rank-00000.jsonl", time.time() + timeout
    while not (progress.exists() and len(progress.read_text().splitlines()) >= steps):
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pipelines(slurm_cluster, tmp_path_factory) -> dict:
    """The tiny pipeline submitted to SLURM and, while the chain runs, the same pipeline run locally."""
    base = tmp_path_factory.mktemp("pipeline")
    t0 = time.time()
    submitted = medgen("run", "--executor", "slurm", *COMMON, f"run.dir={base / 'slurm'}")
    t_submit = time.time() - t0
    medgen("run", *COMMON, "train.batch_size=4", f"run.dir={base / 'local'}")
    states = _wait(base / "slurm")
    return {"slurm": base / "slurm", "local": base / "local", "stdout": submitted.stdout, "states": states,
            "submit_s": t_submit}


@pytest.mark.slurm
@pytest.mark.slow
def test_chain_completes_in_order_with_the_outputs_of_a_local_run(pipelines):
    run, local = pipelines["slurm"], pipelines["local"]
    assert pipelines["submit_s"] < 30, "medgen run --executor slurm must return at once"
    out = pipelines["stdout"]
    for stage, s in _jobs(run)["stages"].items():
        assert f"job {s['job_id']}" in out and s["logs"][0] in out and stage in out
    assert "medgen status" in out and "tail -f" in out

    states = pipelines["states"]
    assert list(states) == list(config.STAGES)
    assert {k: r["State"] for k, r in states.items()} == {k: "COMPLETED" for k in config.STAGES}
    for before, after in zip(config.STAGES, config.STAGES[1:]):  # afterok: each starts once the previous ended
        assert states[after]["Start"] >= states[before]["End"], (before, after, states)

    assert _outputs(run) == _outputs(local)
    assert max_diff(adapter(run), adapter(local)) <= 1e-5
    assert max(v.abs().max().item() for k, v in adapter(run).items() if "lora_B" in k) > 1e-4  # it trained
    for split in ("train", "validation", "test"):  # prepare is deterministic: the same shard bytes
        for f in (local / "data" / split).glob("*.parquet"):
            assert f.read_bytes() == (run / "data" / split / f.name).read_bytes()

    m_slurm, m_local = (json.loads((r / "eval" / "metrics.json").read_text()) for r in (run, local))
    assert (m_slurm["world_size"], m_local["world_size"]) == (2, 1)  # evaluation ran on 2 ranks too
    assert _close(m_slurm["base"], m_local["base"], rel=1e-12)  # no adapter: only the order of sums differs
    for key in ("tokens", "articles", "bytes"):
        assert m_slurm["tuned"][key] == m_local["tuned"][key]
    for key in ("perplexity", "nll_sum"):
        assert m_slurm["tuned"][key] == pytest.approx(m_local["tuned"][key], rel=1e-6)

    g_slurm, g_local = ([json.loads(x) for x in (r / "generations" / "generations.jsonl").read_text().splitlines()]
                        for r in (run, local))
    scores = ("fluency_perplexity", "relevance")  # the judge's: floats of completions that are the same text
    strip = lambda g: [{k: v for k, v in x.items() if k not in ("created", "adapter_fingerprint", *scores)}  # noqa
                       for x in g]
    assert strip(g_slurm) == strip(g_local)  # greedy: adapters 1e-7 apart choose the same tokens
    for a, b in zip(g_slurm, g_local):
        for k in scores:
            assert (a.get(k) is None) == (b.get(k) is None)
            assert a.get(k) is None or a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6)
    assert (run / "report" / "report.md").stat().st_size > 0


def _nodes() -> dict[str, str]:
    """The cluster's nodes as slurmctld knows them: name -> address."""
    out = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, check=True).stdout
    return dict(re.search(r"NodeName=(\S+) .*NodeAddr=(\S+)", ln).groups() for ln in out.splitlines())


def _placements(run: Path, stage: str, world: int) -> list[dict]:
    return [json.loads((run / "ranks" / f"{stage}-rank-{r:05d}.json").read_text()) for r in range(world)]


@pytest.mark.slurm
@pytest.mark.slow
def test_every_distributed_stage_ran_one_rank_on_each_of_two_nodes(pipelines):
    run, local = pipelines["slurm"], pipelines["local"]
    nodes = _nodes()
    assert len(nodes) == 2 and len(set(nodes.values())) == 2, nodes  # sinfo: two nodes, two addresses
    stages = _jobs(run)["stages"]
    for stage in slurm.DISTRIBUTED:
        step = _job_records(f"{stages[stage]['job_id']}.0", "NTasks,NNodes")
        assert step == ["2|2"], f"{stage}: one srun step of 2 tasks on 2 nodes"
        where = _placements(run, stage, 2)
        assert {w["host"]: w["ip"] for w in where} == nodes, (stage, where)  # two hostnames, two IPs
        for w, path in zip(where, stages[stage]["logs"]):
            assert f"rank {w['rank']} of 2 on {w['host']} ({w['ip']}), cpu" in Path(path).read_text()
            if allocator.find_jemalloc() or os.environ.get("CI"):  # every task started again on jemalloc, once
                assert Path(path).read_text().count("allocator: jemalloc (") == 1, (stage, path)
    assert "2 processes, 2 data streams" in Path(stages["train"]["logs"][0]).read_text()
    for path in stages["evaluate"]["logs"]:  # the CPUs the profile gives each task (cpus_per_task: 1), not the node's
        assert re.search(r"evaluate: .* on rank \d/2, context \d+, stride \d+, 1 threads", Path(path).read_text())

    s2, s1 = _samples(run, STEPS), _samples(local, STEPS)["rank-00000.jsonl"]
    r0, r1 = s2["rank-00000.jsonl"], s2["rank-00001.jsonl"]
    assert not {x for step in r0 for x in step} & {x for step in r1 for x in step}  # disjoint blocks
    assert [sorted(a) for a in s1] == [sorted(a + b) for a, b in zip(r0, r1)]  # together: the local batches


@pytest.mark.slurm
@pytest.mark.slow
def test_a_gpu_shaped_profile_runs_one_task_per_fake_gpu(pipelines, tmp_path):
    run = tmp_path / "gpu"
    medgen("run", "--executor", "slurm", *COMMON, "train.max_steps=4", "train.data_streams=4", f"run.dir={run}",
           f"data.shards={pipelines['slurm'] / 'data'}", "slurm.profile=local-gpu", "slurm.nodes=2",
           "slurm.stages=[train,evaluate,generate,report]")
    states = _wait(run)
    assert {k: r["State"] for k, r in states.items()} == {k: "COMPLETED" for k in states}, states
    train = _jobs(run)["stages"]["train"]["job_id"]
    tres = _job_records(train, "AllocTRES", "-X")
    assert "gres/gpu=4" in tres[0], tres  # slurmctld allocated 2 GPUs on each of the 2 nodes
    for stage in slurm.DISTRIBUTED:
        where = _placements(run, stage, 4)
        by_host: dict[str, set] = {}
        for w in where:
            assert w["device"] == "cpu"  # torch sees no CUDA behind the fake devices
            by_host.setdefault(w["host"], set()).add((w["local_rank"], w["gpu"]))
        assert by_host == {h: {(0, "0"), (1, "1")} for h in _nodes()}, (stage, where)  # its own GPU each
    assert json.loads((run / "eval" / "metrics.json").read_text())["world_size"] == 4
    keys = [[(g["id"], g.get("sample", 0)) for g in map(json.loads, (r / "generations" / "generations.jsonl").open())]
            for r in (run, pipelines["local"])]
    assert keys[0] == keys[1] and len(set(keys[0])) == len(keys[0])  # every prompt exactly once


@pytest.mark.slurm
@pytest.mark.slow
def test_preemption_requeues_and_resumes_to_the_uninterruptedadapter(pipelines, tmp_path):
    from submitit.slurm.slurm import SlurmJob

    run, reference = tmp_path / "pre", pipelines["slurm"]
    medgen("run", "--executor", "slurm", *COMMON, f"run.dir={run}", f"data.shards={reference / 'data'}",
           "slurm.stages=[train]")
    info = _jobs(run)
    job_id = info["stages"]["train"]["job_id"]
    _wait_for_progress(run)
    SlurmJob(folder=info["folder"], job_id=job_id, tasks=[0, 1])._interrupt()  # SIGTERM + USR2, as on preemption

    assert _wait(run)["train"]["State"] == "COMPLETED"
    history = [r["State"] for r in _sacct(run, "--duplicates", fields="JobID,State")]
    assert history == ["REQUEUED", "COMPLETED"], history
    _assert_rerun_skipped_the_first_step_id(job_id)
    log_text = Path(info["stages"]["train"]["logs"][0]).read_text()
    resumed = re.findall(r"resuming from \S+/step-(\d+)", log_text)
    assert len(resumed) == 1 and 2 <= int(resumed[0]) < STEPS, "the signal should land mid-training"
    assert "Requeued job" in log_text
    assert max_diff(adapter(run), adapter(reference)) <= 1e-6
    assert _samples(run, STEPS) == _samples(reference, STEPS)  # no block trained twice or skipped


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.slurm
@pytest.mark.slow
def test_a_lost_node_fails_the_job_which_is_requeued_and_resumes_exactly(pipelines, tmp_path):
    run, reference = tmp_path / "lost", pipelines["slurm"]
    medgen("run", "--executor", "slurm", *COMMON, f"run.dir={run}", f"data.shards={reference / 'data'}",
           "slurm.stages=[train]", "train.save_steps=2")
    info = _jobs(run)
    deadline = time.time() + 600
    while not list((run / "checkpoints").glob("step-*")):
        assert time.time() < deadline, "no checkpoint was committed"
        time.sleep(0.1)
    first = _placements(run, "train", 2)
    lost, survivor = first[1], first[0]
    crash = subprocess.run(["bash", str(ROOT / "slurm" / "cluster.sh"), "crash", lost["host"], "--nodes", "2"],
                           capture_output=True, text=True, check=True)
    t_crash = time.time()

    # SLURM notices (SlurmdTimeout), fails the job with NODE_FAIL and requeues it; it waits for two nodes
    deadline = time.time() + 180
    while "NODE_FAIL" not in {r["State"] for r in _sacct(run, "--duplicates", fields="JobID,State")}:
        assert time.time() < deadline, f"no NODE_FAIL after {crash.stdout}"
        time.sleep(1)
    t_fail = time.time()
    deadline = time.time() + 30  # the survivor must not sit in a collective past its job's life (KillWait=5)
    while _running(survivor["pid"]):
        assert time.time() < deadline, (f"rank 0 (pid {survivor['pid']}) still runs "
                                        f"{time.time() - t_fail:.0f} s after NODE_FAIL")
        time.sleep(0.5)
    pending = subprocess.run(["squeue", "-h", "-o", "%T", "-j", info["stages"]["train"]["job_id"]],
                             capture_output=True, text=True).stdout.split()
    assert pending == ["PENDING"], pending  # requeued, not left failed

    local_cluster(2)  # the node comes back (cluster.sh up restarts its slurmd; ReturnToService=2)
    assert _wait(run)["train"]["State"] == "COMPLETED"
    history = [r["State"] for r in _sacct(run, "--duplicates", fields="JobID,State")]
    assert history == ["NODE_FAIL", "COMPLETED"], history
    log_text = Path(info["stages"]["train"]["logs"][0]).read_text()
    resumed = [int(n) for n in re.findall(r"resuming from \S+/step-(\d+)", log_text)]
    assert len(resumed) == 1 and 2 <= resumed[0] < STEPS, resumed  # a committed step-N, never a partial one
    assert "stopped by a signal" not in log_text and "Requeued job" not in log_text
    _assert_rerun_skipped_the_first_step_id(info["stages"]["train"]["job_id"])
    assert max_diff(adapter(run), adapter(reference)) <= 1e-5
    assert _samples(run, STEPS) == _samples(reference, STEPS)  # the steps after step-N were redone, once
    assert t_fail - t_crash < 120


def _wait_for_idle_nodes(n: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split().count(
            "idle") < n:
        assert time.time() < deadline, "the cluster's nodes stayed busy"
        time.sleep(1)


HANG = ["run.hang_timeout=20", "run.start_timeout=60", "data.retry_seconds=5"]  # the watchdog, lowered


def _stop_rank(run: Path, stage: str, rank: int, when=lambda: True, timeout: float = 600) -> dict:
    """SIGSTOP the process of ``rank`` (on its node; the cluster's nodes share this machine's PIDs) once its
    stage has started (its first heartbeat) and ``when()`` holds: a frozen rank, which neither exits nor logs."""
    beat, deadline = run / "ranks" / f"heartbeat-{stage}-rank-{rank:05d}.json", time.time() + timeout
    while not (beat.exists() and when()):
        assert time.time() < deadline, f"{stage} rank {rank} never started"
        time.sleep(0.05)
    where = json.loads(beat.read_text())
    os.kill(where["pid"], signal.SIGSTOP)
    return where


def _hang_report(run: Path, stage: str, stopped: dict) -> dict:
    report = json.loads((run / "hang" / f"{stage}.json").read_text())
    states = {r["rank"]: r for r in report["ranks"]}
    assert states[1]["state"] == "stopped responding" and states[1]["host"] == stopped["host"], report
    assert states[0]["state"] == "waiting" and report["reporter"] == 0, report
    assert (run / "hang" / f"{stage}-rank-00000-stacks.txt").exists()
    return report


@pytest.mark.slurm
@pytest.mark.slow
def test_a_stopped_rank_is_reported_and_the_job_requeued_and_resumed_exactly(pipelines, tmp_path):
    run, reference = tmp_path / "hang", pipelines["slurm"]
    medgen("run", "--executor", "slurm", *COMMON, *HANG, f"run.dir={run}", f"data.shards={reference / 'data'}",
           "slurm.stages=[train]", "train.save_steps=2")
    job_id = _jobs(run)["stages"]["train"]["job_id"]
    stopped = _stop_rank(run, "train", 1, lambda: bool(list((run / "checkpoints").glob("step-*"))))
    assert _wait(run)["train"]["State"] == "COMPLETED"
    history = [r["State"] for r in _sacct(run, "--duplicates", fields="JobID,State")]
    assert history == ["REQUEUED", "COMPLETED"], history
    report = _hang_report(run, "train", stopped)
    log_text = Path(_jobs(run)["stages"]["train"]["logs"][0]).read_text()
    assert "stopped responding" in log_text and f"requeueing SLURM job {job_id}" in log_text
    resumed = [int(n) for n in re.findall(r"resuming from \S+/step-(\d+)", log_text)]
    assert len(resumed) == 1 and 2 <= resumed[0] < STEPS and report["step"] >= 2, (resumed, report["step"])
    assert max_diff(adapter(run), adapter(reference)) <= 1e-5
    assert _samples(run, STEPS) == _samples(reference, STEPS)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["evaluate", "generate"])
def test_a_stopped_rank_in_evaluate_or_generate_is_requeued_and_the_output_exact(pipelines, tmp_path, stage):
    run, reference = tmp_path / stage, pipelines["slurm"]
    shutil.copytree(reference / "adapter", run / "adapter")
    medgen("run", "--executor", "slurm", *COMMON, *HANG, f"run.dir={run}", f"data.shards={reference / 'data'}",
           f"slurm.stages=[{stage}]")
    stopped = _stop_rank(run, stage, 1)
    assert _wait(run)[stage]["State"] == "COMPLETED"
    history = [r["State"] for r in _sacct(run, "--duplicates", fields="JobID,State")]
    assert history == ["REQUEUED", "COMPLETED"], history
    _hang_report(run, stage, stopped)
    if stage == "evaluate":
        ours, theirs = (json.loads((d / "eval" / "metrics.json").read_text()) for d in (run, reference))
        for m in (ours, theirs):
            m.pop("timing")
        assert _close(ours, theirs, 1e-9)
    else:  # every prompt exactly once, the same completions
        lines = [json.loads(x) for x in (run / "generations" / "generations.jsonl").read_text().splitlines()]
        want = [json.loads(x) for x in (reference / "generations" / "generations.jsonl").read_text().splitlines()]
        assert [(r["id"], r["completion"]) for r in lines] == [(r["id"], r["completion"]) for r in want]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_that_lost_a_node_goes_on_with_the_one_it_has(pipelines, tmp_path):
    """slurm.min_nodes=1: the requeued training starts on node 1 alone while node 2 stays down, keeps its data
    order and global batch (medgen/elastic.py), and ends with the uninterrupted run's adapter."""
    reference = pipelines["slurm"]
    for attempt in range(3):  # --nodes=1-2 starts on one node when the other is busy (another test's job)
        run = tmp_path / f"elastic-{attempt}"
        medgen("run", "--executor", "slurm", *COMMON, f"run.dir={run}", f"data.shards={reference / 'data'}",
               "slurm.stages=[train]", "train.save_steps=2", "slurm.min_nodes=1")
        script = next(Path(_jobs(run)["folder"]).rglob("*_submission.sh")).read_text()
        assert "#SBATCH --nodes=1-2" in script
        placement, deadline = run / "ranks" / "train-rank-00000.json", time.time() + 600
        while not placement.exists():
            assert time.time() < deadline, "training never started"
            time.sleep(0.1)
        if json.loads(placement.read_text())["world_size"] == 2:
            break
        subprocess.run(["scancel", _jobs(run)["stages"]["train"]["job_id"]], check=True)
        _wait(run)
        _wait_for_idle_nodes(2)
    else:
        pytest.fail("the cluster never had two free nodes for the job")
    deadline = time.time() + 600
    while not list((run / "checkpoints").glob("step-*")):
        assert time.time() < deadline, "no checkpoint was committed"
        time.sleep(0.1)
    first = _placements(run, "train", 2)
    try:
        subprocess.run(["bash", str(ROOT / "slurm" / "cluster.sh"), "crash", first[1]["host"], "--nodes", "2"],
                       capture_output=True, text=True, check=True)
        assert _wait(run)["train"]["State"] == "COMPLETED"  # node 2 is still down
        history = [r["State"] for r in _sacct(run, "--duplicates", fields="JobID,State,NNodes")]
        assert history == ["NODE_FAIL", "COMPLETED"], history
        nnodes = [r["NNodes"] for r in _sacct(run, "--duplicates", fields="JobID,State,NNodes")]
        assert nnodes == ["2", "1"], nnodes
        rank0 = json.loads((run / "ranks" / "train-rank-00000.json").read_text())
        assert rank0["world_size"] == 1 and rank0["host"] == first[0]["host"]
        log_text = Path(_jobs(run)["stages"]["train"]["logs"][0]).read_text()
        assert "resuming a run checkpointed on 2 processes on 1" in log_text
        assert max_diff(adapter(run), adapter(reference)) <= 1e-5
    finally:
        local_cluster(2)  # node 2 back for the tests after this one


@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_stops_training_for_good_after_a_checkpoint(pipelines, tmp_path):
    # scancel sends SIGTERM too: train checkpoints, but requeueing then would undo the cancel
    run = tmp_path / "cancel"
    medgen("run", "--executor", "slurm", *COMMON, f"run.dir={run}", f"data.shards={pipelines['slurm'] / 'data'}",
           "slurm.stages=[train]")
    _wait_for_progress(run)
    subprocess.run(["scancel", _jobs(run)["stages"]["train"]["job_id"]], check=True)
    log, deadline = Path(_jobs(run)["stages"]["train"]["logs"][0]), time.time() + 120
    while not re.search(r"so it is not requeued|Requeued job", log.read_text()):  # the job's own decision
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    assert "so it is not requeued" in log.read_text()
    assert _wait(run)["train"]["State"].startswith("CANCELLED")
    assert [r["State"].split()[0] for r in _sacct(run, "--duplicates", fields="JobID,State")] == ["CANCELLED"]
    assert list((run / "checkpoints").glob("step-*")), "SIGTERM should leave a checkpoint to resume from"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_failed_stage_cancels_its_dependents_and_status_names_it(slurm_cluster, tmp_path):
    # train fails early (no prepared dataset where data.shards points), after its chain was submitted
    run = tmp_path / "fail"
    args = ["run", "--executor", "slurm", *COMMON, f"run.dir={run}", f"data.shards={tmp_path / 'no-such-dataset'}",
            "slurm.stages=[train,evaluate,generate,report]"]
    medgen(*args)
    again = medgen(*args, check=False)  # a second chain on the same run.dir would train into the same checkpoints
    assert again.returncode == 2 and "already has a SLURM chain" in again.stderr

    states = {k: r["State"].split()[0] for k, r in _wait(run).items()}
    assert states == {"train": "FAILED", "evaluate": "CANCELLED", "generate": "CANCELLED", "report": "CANCELLED"}
    status = medgen("status", str(run), check=False)
    assert status.returncode == 1
    failed_log = _jobs(run)["stages"]["train"]["logs"][0]
    assert "stage train failed (FAILED" in status.stdout and f"see {failed_log}" in status.stdout
    assert "cancelled: evaluate, generate, report" in status.stdout
    assert "no manifest.json at" in Path(failed_log).read_text()  # the named log holds the cause
    error = status.stdout.splitlines()[status.stdout.splitlines().index(next(
        line for line in status.stdout.splitlines() if line.startswith("stage train failed"))) + 1]
    assert "no manifest.json at" in error  # ... and status shows it: SLURM's exit code does not say it
    assert status.stdout.count("(no log: never started)") == 3  # the cancelled stages never wrote one


@pytest.mark.slurm
@pytest.mark.parametrize("profile, refusal", [
    ({"partition": "nosuchpartition"}, "sbatch refused the prepare stage (1 node(s) x 1 task(s), partition "
                                       "nosuchpartition): invalid partition specified: nosuchpartition"),
    ({"gpus_per_node": 3}, "sbatch refused the train stage (2 node(s) x 3 task(s), 3 GPU(s) per node, partition "
                           "debug): Requested node configuration is not available"),
    ({"nodes": 3}, "sbatch refused the train stage (3 node(s) x 1 task(s), partition debug): Requested node "
                   "configuration is not available"),
])
def test_what_the_cluster_cannot_give_is_refused_in_one_line_before_anything_is_queued(slurm_cluster, tmp_path,
                                                                                         profile, refusal):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"partition": "debug", "nodes": 2, **profile}))
    queued = lambda: subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()  # noqa
    before = queued()
    proc = medgen("run", "--executor", "slurm", *COMMON, f"run.dir={tmp_path / 'r'}", f"slurm.profile={path}",
                  check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"medgen: error: {refusal}"], proc.stderr
    assert queued() == before
    assert not (tmp_path / "r").exists()  # nothing submitted, nothing written


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_conf_chooses_the_cluster_for_sbatch_sacct_and_the_jobs(slurm_cluster, tmp_path):
    confs = {"one": local_cluster(1), "two": slurm_cluster["conf"]}  # two clusters up on this host
    for name, conf in confs.items():
        medgen("run", "--executor", "slurm", *COMMON, f"run.dir={tmp_path / name}", "slurm.stages=[prepare]",
               "slurm.nodes=1", env={"SLURM_CONF": conf})
    for name, conf in confs.items():
        rec = _wait(tmp_path / name, conf=conf)["prepare"]
        cluster = Path(conf).read_text().split("ClusterName=")[1].split()[0]
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, check=True,
                               env={**os.environ, "SLURM_CONF": conf}).stdout.split()
        assert (rec["State"], rec["Cluster"]) == ("COMPLETED", cluster) and rec["NodeList"] in nodes, (name, rec)
        status = medgen("status", str(tmp_path / name), env={"SLURM_CONF": conf})  # sacct on the same cluster
        assert "COMPLETED" in status.stdout

    # down leaves nothing of that cluster behind (daemons, namespaces, veths, bridge, /etc/netns) and stops
    # nothing of the other
    state = Path(confs["one"]).parent
    pids = [int(p.read_text()) for p in (state / "run").glob("*.pid") if not p.name.endswith(".daemon.pid")]
    assert len(pids) == 5, pids  # munged, mariadbd, slurmdbd, slurmctld, one slurmd
    subprocess.run(["bash", str(ROOT / "slurm" / "cluster.sh"), "down", "--nodes", "1"], check=True,
                   capture_output=True)
    assert not [p for p in pids if _running(p)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert "mg1" not in links and "mg1" not in netns and not list(Path("/etc").glob("netns/mg1*"))
    assert "mg2n1" in netns and local_cluster(2) == confs["two"]  # the two-node cluster still answers


@pytest.mark.slurm
@pytest.mark.slow
def test_the_prepare_job_uses_the_cpus_its_profile_gives_it(slurm_cluster, tmp_path):
    cpus = {"one": 1, "two": 2}  # the test cluster's nodes have 2 cores each
    for name, n in cpus.items():
        (tmp_path / name).mkdir()
        medgen("run", "--executor", "slurm", *COMMON, f"run.dir={tmp_path / name}", "slurm.stages=[prepare]",
               f"slurm.profile={_profile(tmp_path / name, cpus_per_task=n, nodes=1)}")
    for name, n in cpus.items():
        assert _wait(tmp_path / name)["prepare"]["State"] == "COMPLETED"
        log = Path(_jobs(tmp_path / name)["stages"]["prepare"]["logs"][0]).read_text()
        assert re.findall(r"prepare: (\d+) worker process", log) == [str(n)], log[-3000:]
        report = json.loads((tmp_path / name / "data" / "prepare_report.json").read_text())
        assert report["timing"]["workers"] == n


@pytest.mark.slurm
@pytest.mark.slow
def test_a_submission_under_umask_002_is_private_to_its_owner(slurm_cluster, tmp_path):
    """Compute nodes unpickle what is in the SLURM folder and run it as the submitting user: the folder, job
    scripts, pickles and logs are the owner's alone whatever the umask; the stage's outputs keep the umask."""
    run = tmp_path / "run"
    subprocess.run(["bash", "-c", 'umask 002 && exec "$@"', "bash", *command(
        "run", "--executor", "slurm", *COMMON, f"run.dir={run}", "slurm.stages=[prepare]")],
        cwd=ROOT, check=True, capture_output=True)
    assert _wait(run)["prepare"]["State"] == "COMPLETED"
    folder = Path(_jobs(run)["folder"])
    assert [oct(d.stat().st_mode & 0o777) for d in (folder.parent, folder)] == ["0o700", "0o700"]
    files = [p for p in folder.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files} | {"log" for p in files if p.name.endswith("_log.out")}
    assert {".pkl", ".sh", ".yaml", "log"} <= kinds, sorted(p.name for p in files)
    loose = [f"{p.name} {oct(p.stat().st_mode & 0o777)}" for p in files if p.stat().st_mode & 0o077]
    assert not loose, loose
    shard = next((run / "data" / "train").glob("*.parquet"))
    assert shard.stat().st_mode & 0o777 == 0o664  # the job's own outputs: as the submitting shell's umask makes them

    shared = tmp_path / "shared-folder"
    shared.mkdir()
    shared.chmod(0o775)
    proc = medgen("run", "--executor", "slurm", *COMMON, f"run.dir={tmp_path / 'r2'}", f"slurm.folder={shared}",
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("medgen:")] == [
        f"medgen: error: slurm.folder {shared}: group or others can write to it (mode 775), and SLURM jobs run the "
        "pickles submitted into it; chmod go-w it, or choose another slurm.folder"]
    assert list(shared.iterdir()) == []


# --------------------------------------------------------------------------- no cluster needed


def test_dry_run_prints_the_sbatch_scripts_and_submits_nothing(tmp_path):
    run = tmp_path / "dry"
    proc = medgen("run", "--executor", "slurm", "--dry-run", *COMMON, f"run.dir={run}")
    scripts = proc.stdout.split("#!/bin/bash")[1:]
    assert len(scripts) == len(config.STAGES)
    by_stage = dict(zip(config.STAGES, scripts))
    assert "--dependency" not in by_stage["prepare"]
    assert "#SBATCH --dependency='afterok:<prepare job id>'" in by_stage["train"]
    for stage, text in by_stage.items():
        nodes = 2 if stage in slurm.DISTRIBUTED else 1  # the local profile: 2 nodes x 1 task for those
        assert f"#SBATCH --nodes={nodes}" in text and "#SBATCH --ntasks-per-node=1" in text, stage
        for line in ("#SBATCH --kill-on-invalid-dep=yes", "#SBATCH --requeue", "#SBATCH --signal=USR2@90",
                     "#SBATCH --partition=debug", f"export PYTHONPATH={ROOT}", "--kill-on-bad-exit=1",
                     slurm.SKIP_OLD_STEP_IDS):
            assert line in text, (stage, line)
        # the short steps that skip an earlier run's step numbers come before the stage's own srun
        assert text.index(slurm.SKIP_OLD_STEP_IDS) < text.index("srun --unbuffered"), stage
        assert "torchrun" not in text
    assert not run.exists(), "a dry run writes nothing"


def _profile(tmp_path: Path, **fields) -> str:
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump({"partition": "debug", **fields}))
    return str(path)


def test_every_value_that_reaches_sbatch_is_validated(tmp_path):
    bad = _profile(tmp_path, partition="debug\nrm -rf ~", account="a b", qos="$(id)", constraint="h100;reboot",
                   nodes=0, sbatch={"wrap": "id", "mail-user": "x y", "Bad Key": 1, "comment": "a\nb"})
    with pytest.raises(ConfigError) as e:
        slurm.plan(config.load_config(None, [f"slurm.profile={bad}"]), tmp_path)
    text = "\n".join(e.value.problems)
    for culprit in ("partition:", "account:", "qos:", "constraint:", "nodes:", "sbatch: wrap", "sbatch: mail-user",
                    "'Bad Key'", "sbatch: comment"):
        assert culprit in text, culprit
    assert len(e.value.problems) == 9
    for path in (tmp_path / "a b", tmp_path / "x$(id)", tmp_path / "50%"):  # paths go into #SBATCH lines too
        with pytest.raises(UserError, match="SLURM paths may hold only"):
            slurm.plan(config.load_config(None, [f"run.dir={path}"]), path / "slurm")
    # the job name comes from run.name: made safe rather than refused
    cfg = config.load_config("configs/tiny.yaml", ["run.name=my run;$(id)"])
    assert slurm.plan(cfg, tmp_path)[0].params["job_name"] == "medgen-my_run___id_-prepare"


def test_cli_reports_profile_mistakes_one_line_each(tmp_path):
    bad = _profile(tmp_path, partition="a'b", timeout_min="soon")
    proc = medgen("run", "--config", "configs/tiny.yaml", "--executor", "slurm", "--dry-run",
                  f"slurm.profile={bad}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and any("partition" in x for x in lines) and any("timeout_min" in x for x in lines)
    missing = medgen("run", "--executor", "slurm", "--dry-run", "slurm.profile=nope", check=False)
    assert missing.returncode == 2 and "known: gpu-example, local, local-gpu" in missing.stderr


def test_slurm_config_is_checked():
    with pytest.raises(ConfigError) as e:
        config.load_config(None, ["slurm.stages=[train,prepare]", "slurm.nodes=-1"])
    text = "\n".join(e.value.problems)
    assert "slurm.stages: must list stages once each, in pipeline order" in text and "slurm.nodes" in text
    with pytest.raises(ConfigError, match="unknown stage"):
        config.load_config(None, ["slurm.stages=[train,bake]"])
    # a signal due within a minute of the start would hit every restart at once (submitit gives up)
    with pytest.raises(ConfigError, match="signal_delay_s"):
        slurm.plan(config.load_config(None, ["slurm.timeout_min=2", "slurm.signal_delay_s=75"]), Path("/tmp/x"))
    assert slurm.plan(config.load_config(None, ["slurm.timeout_min=3", "slurm.signal_delay_s=75"]), Path("/tmp/x"))


def test_gpu_profile_runs_one_task_per_gpu_on_every_node(tmp_path):
    cfg = config.load_config("configs/tiny.yaml", ["slurm.profile=gpu-example", "slurm.nodes=4"])
    plans = {p.stage: p for p in slurm.plan(cfg, tmp_path)}
    train = plans["train"].params
    assert (train["nodes"], train["ntasks_per_node"], train["gpus_per_node"], plans["train"].tasks) == (4, 8, 8, 32)
    assert train["additional_parameters"]["exclusive"] is True and train["account"] == "my-project"
    prepare = plans["prepare"].params
    assert (prepare["nodes"], prepare["ntasks_per_node"], plans["prepare"].tasks) == (1, 1, 1)
    assert "gpus_per_node" not in prepare


def test_status_of_a_directory_without_a_run_is_a_user_error(tmp_path):
    proc = medgen("status", str(tmp_path), check=False)
    assert proc.returncode == 2 and "nothing of a medgen run here" in proc.stderr
    proc = medgen("status", str(tmp_path / "typo"), check=False)
    assert proc.returncode == 2 and "no such run directory" in proc.stderr


def test_status_of_a_run_on_this_machine(tiny_run, tmp_path):
    out = medgen("status", str(tiny_run)).stdout
    assert "run on this machine" in out
    states = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert states == dict.fromkeys(("prepare", "train", "evaluate", "generate", "report"), "finished")
    # a training that stopped at a checkpoint: status says so and where it resumes from
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "data", run / "data")
    shutil.copytree(tiny_run / "checkpoints", run / "checkpoints")
    out = medgen("status", str(run)).stdout
    assert re.search(r"train\s+stopped\s+checkpoint .*step-\d+", out) and "evaluate  -" in out


@pytest.mark.slurm
@pytest.mark.slow
def test_job_logs_show_progress_lines_at_the_interval(slurm_cluster, tmp_path, medium_sample):
    """A job log is not a terminal: prepare, evaluate and generate each log a line at least every
    run.progress_every seconds while they work, on every rank (issue #25). The real Medium sample and a second
    interval, so that each stage works for several seconds."""
    run = tmp_path / "progress"
    medgen("run", "--executor", "slurm", *TINY, f"run.dir={run}", "run.progress_every=1", "model.base_only=true",
           f"data.source=[{medium_sample},{medium_sample}]", "generate.batch_size=1", "generate.max_new_tokens=96",
           # every test article (35) and 96 new tokens: seconds of work on each rank on jemalloc too (6 articles took
           # 1.4 s, 24 tokens 1.2 s)
           "eval.max_articles=40", "slurm.stages=[prepare,evaluate,generate]")
    states = _wait(run)
    assert {k: r["State"] for k, r in states.items()} == {k: "COMPLETED" for k in states}, states
    stages = _jobs(run)["stages"]
    prep = progress_lines(Path(stages["prepare"]["logs"][0]).read_text(), "prepare", every=1)
    size = f"{2 * medium_sample.stat().st_size / 1e6:.1f}"  # twice: several seconds of work on one CPU
    assert prep[-1]["done"] == prep[-1]["total"] == size and prep[-1]["rows"] == "1000"
    for stage, what in (("evaluate", "eval base"), ("generate", "generate")):
        assert len(stages[stage]["logs"]) == 2
        for path in stages[stage]["logs"]:  # each rank its own log, its own share of the work
            last = progress_lines(Path(path).read_text(), what, every=1)[-1]
            assert last["done"] == last["total"] != "0", (stage, path)


def test_the_rendezvous_port_is_one_per_job_below_the_ephemeral_ports():
    from medgen.dist import rendezvous_port

    ports = {rendezvous_port(str(job)) for job in range(3000, 3200)}
    assert all(20000 <= p < 32768 for p in ports) and len(ports) > 190  # spread: neighbouring jobs rarely share one
    assert rendezvous_port("3805") == rendezvous_port("3805")
