"""Shared fixtures: a tiny end-to-end run (random 2-layer GPT-2, real tokenizer) built once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "medium"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def medgen(*args: str, check: bool = True, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "medgen", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"medgen {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    medgen("run", "--config", "configs/tiny.yaml", f"run.dir={run_dir}")
    return run_dir


@pytest.fixture
def medium_sample() -> Path:
    path = SHARED / "medium-articles-500.csv"
    if not path.exists():
        pytest.skip(f"real Medium sample not found at {path} (CI has it beside the checkout)")
    return path


def start_moto(host: str) -> tuple[subprocess.Popen, str]:
    """A moto S3 server listening on ``host`` (a free port), and its endpoint URL, once it answers."""
    import shutil
    import socket
    import time
    import urllib.request

    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        pytest.fail("moto_server is not installed: run `make install`")
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", host, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://{host}:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"moto_server did not start on {endpoint}")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on 127.0.0.1, credentials passed only through the environment."""
    proc, endpoint = start_moto("127.0.0.1")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "MEDGENTESTKEYID", "AWS_SECRET_ACCESS_KEY": "medgen-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("medgen-test")
    yield {"endpoint": endpoint, "bucket": "medgen-test", "env": env}
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _slurm_conf(env_sh: Path) -> str:
    """SLURM_CONF as `source env.sh` sets it ('' before the cluster was ever brought up)."""
    if not env_sh.exists():
        return ""
    out = subprocess.run(["bash", "-c", f"source {env_sh} && echo $SLURM_CONF"], capture_output=True, text=True)
    return out.stdout.strip()


def _sinfo_nodes(conf: str) -> int:
    """How many nodes of the cluster SLURM_CONF names are up (0 when it does not answer)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "SLURM_CONF": conf})
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in out.stdout.split())


def local_cluster(nodes: int) -> str:
    """SLURM_CONF of slurm/cluster.sh's cluster of that many nodes, brought up (or back) if needed.

    Skips only where SLURM cannot run here (cluster.sh exit 3), never in CI (CI or MEDGEN_REQUIRE_SLURM set).
    """
    env_sh = Path(os.environ.get("MEDGEN_INFRA", "/tmp/medgen-infra")) / f"slurm-{nodes}node" / "env.sh"
    if _sinfo_nodes(_slurm_conf(env_sh)) != nodes:  # not up, or a node left down by a test
        up = subprocess.run(["bash", str(ROOT / "slurm" / "cluster.sh"), "up", "--nodes", str(nodes)],
                            capture_output=True, text=True, timeout=900)
        if up.returncode == 3:
            reason = f"SLURM cannot run on this machine: {up.stderr.strip()}"
            if os.environ.get("CI") or os.environ.get("MEDGEN_REQUIRE_SLURM"):
                pytest.fail(reason + " (CI/MEDGEN_REQUIRE_SLURM is set: the SLURM tests must run)")
            pytest.skip(reason)
        assert up.returncode == 0, f"slurm/cluster.sh up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
    conf = _slurm_conf(env_sh)
    assert _sinfo_nodes(conf) == nodes, \
        f"sinfo fails with SLURM_CONF={conf}: see the logs in {Path(conf).parent / 'log'}"
    return conf


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """The two-node SLURM cluster of slurm/cluster.sh (`make test` starts it first; this starts it otherwise).

    Puts its SLURM_CONF into os.environ, so the CLI, sbatch and the jobs all find it.
    """
    conf = local_cluster(2)
    os.environ["SLURM_CONF"] = conf
    return {"conf": conf, "nodes": 2}


def pytest_collection_modifyitems(config, items):
    """Files with SLURM tests first: under `make test` (-n 2 --dist loadfile) they then spend their waits on
    the scheduler while the other worker runs the CPU-bound files, instead of starting last."""
    slurm_files = {item.path for item in items if item.get_closest_marker("slurm")}
    items.sort(key=lambda item: item.path not in slurm_files)  # stable: the order within a file is kept
