"""What the tests share besides fixtures (those are in conftest.py): paths, the one way to run the real CLI, and
the settings of the reference training run that several files compare against."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "medium"
TINY = ("--config", "configs/tiny.yaml")

# The reference training run (conftest.reference_run): 8 steps of the tiny config on the tiny run's shards,
# two data streams (so 1 and 2 processes read the same blocks), LoRA dropout on (so resuming must restore its
# RNG), a checkpoint every 2 steps. Runs meant to equal it use these settings.
REFERENCE_STEPS = 8
REFERENCE_TRAIN = (f"train.max_steps={REFERENCE_STEPS}", "train.data_streams=2", "train.warmup_steps=2",
                   "train.batch_size=4", "lora.dropout=0.05", "train.save_steps=2")


def marks_its_tests(*markers: str):
    """For a fixture: every test that uses it (directly or through other fixtures) gets these markers
    (conftest.pytest_collection_modifyitems): ``slow`` for a costly one, ``s3``/``slurm`` for a service."""
    def mark(fn):
        fn._medgen_marks = (*getattr(fn, "_medgen_marks", ()), *markers)
        return fn
    return mark


def env(**extra: str) -> dict[str, str]:
    """The environment of a CLI run: this one, on the CPU, one thread per process unless told otherwise."""
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **extra}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "medgen", *args]


def launched(nproc: int, *args: str) -> list[str]:
    """The CLI with ``args`` in one process, or under torchrun as ``nproc`` processes on a free-ish port."""
    if nproc == 1:
        return command(*args)
    import random

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(random.randint(20000, 40000)),
            "-m", "medgen", *args]


def medgen(*args: str, check: bool = True, env: dict | None = None, timeout: int = 600,
           memory_limit: int = 0) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process (``env``: added to this process's environment; ``memory_limit``: its
    address space in bytes, RLIMIT_AS, where an allocation past it fails as it does on a full machine)."""
    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    proc = subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, preexec_fn=limited if memory_limit else None)
    if check and proc.returncode != 0:
        raise AssertionError(f"medgen {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two adapters' tensors (same keys)."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --------------------------------------------------------------------------- services the tests start


FAST_TIER = "MEDGEN_TEST_TIER"  # set to "fast" by `make test-fast`: no service may start


def no_services_in_the_fast_tier(what: str) -> None:
    if os.environ.get(FAST_TIER) == "fast":
        raise RuntimeError(f"a test of the fast tier started {what}: use its fixture (s3_server, slurm_cluster), "
                           "which marks the test, instead of starting it by hand")


def start_moto(host: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """A moto S3 server listening on ``host`` (a free port), and its endpoint URL, once it answers (an
    authentication error is an answer); ``env``: added to its environment."""
    no_services_in_the_fast_tier("the S3 server")
    import shutil
    import time
    import urllib.error
    import urllib.request

    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        raise RuntimeError("moto_server is not installed: run `make install`")
    port = free_port(host)
    proc = subprocess.Popen([exe, "-H", host, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    endpoint = f"http://{host}:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except urllib.error.HTTPError:
            return proc, endpoint  # answering (403: authentication is on)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not start on {endpoint}")


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_mlflow(folder: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    """A real MLflow tracking server on ``host`` (a free port) with its SQLite store and artifacts in
    ``folder``, and its URI once /health answers (the first start creates the database: ~10 s)."""
    no_services_in_the_fast_tier("the MLflow server")
    import time
    import urllib.request

    exe = Path(sys.executable).with_name("mlflow")
    if not exe.exists():
        raise RuntimeError("mlflow is not installed: run `make install`")
    port = free_port(host)
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(exe), "server", "--host", host, "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "artifacts")],
                            stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://{host}:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            return proc, uri
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the MLflow server did not start on {uri}: {(folder / 'server.log').read_text()[-2000:]}")


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
    # a state's suffix flags (sinfo's *~#!%$@^-+: not responding, powering, planned, ...) are not its state
    return sum(s.rstrip("*~#!%$@^-+") in ("idle", "mixed", "allocated", "completing") for s in out.stdout.split())


def local_cluster(nodes: int) -> str:
    """SLURM_CONF of slurm/cluster.sh's cluster of that many nodes, brought up (or back) if needed.

    Skips only where SLURM cannot run here (cluster.sh exit 3), never in CI (CI or MEDGEN_REQUIRE_SLURM set).
    """
    no_services_in_the_fast_tier("the SLURM cluster")
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
    import time

    deadline = time.time() + 60  # a node cluster.sh just brought back may be picked by a pending job meanwhile
    while _sinfo_nodes(conf) != nodes and time.time() < deadline:
        time.sleep(1)
    if _sinfo_nodes(conf) != nodes:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30,
                                env={**os.environ, "SLURM_CONF": conf})
        raise AssertionError(f"{nodes} nodes not up with SLURM_CONF={conf} (sinfo: {states.stdout.split()} "
                             f"{states.stderr.strip()}): see the logs in {Path(conf).parent / 'log'}")
    return conf
