"""Fixtures, and the markers tests get from them.

Markers are not written by hand on tests that use a service: a fixture says what its tests are
(``helpers.marks_its_tests``): every test that uses the S3 server (``s3_server``, directly or through another
fixture) is marked ``s3`` and ``slow``, the SLURM cluster ``slurm`` and ``slow``, a costly fixture (a whole
pipeline or training run) ``slow``. Tests whose own body is costly (whole CLI runs) are marked slow where
they are written. ``make test-fast`` runs the rest:
every pure unit test, no service started (tests/helpers.py refuses to start one under it).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REFERENCE_TRAIN, SHARED, TINY, local_cluster, marks_its_tests, medgen, start_moto

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


costly = marks_its_tests("slow")  # a whole pipeline or training run


@pytest.fixture(scope="session")
@costly
def tiny_run(tmp_path_factory) -> Path:
    """The whole tiny pipeline (random 2-layer GPT-2, real tokenizer), once per session."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    medgen("run", *TINY, f"run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="session")
def shards(tiny_run) -> str:
    """The tiny run's prepared dataset, which the training tests train on."""
    return str(tiny_run / "data")


@pytest.fixture(scope="session")
@costly
def reference_run(tmp_path_factory, tiny_run) -> Path:
    """The reference training run (helpers.REFERENCE_TRAIN) on the tiny run's shards, one process: what the
    resume, full-disk and multi-process tests compare their adapters with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    medgen("train", *TINY, f"run.dir={run_dir}", f"data.shards={tiny_run / 'data'}", *REFERENCE_TRAIN,
           env={"OMP_NUM_THREADS": "1"})
    return run_dir


@pytest.fixture
def medium_sample() -> Path:
    path = SHARED / "medium-articles-500.csv"
    if not path.exists():
        pytest.skip(f"real Medium sample not found at {path} (CI has it beside the checkout)")
    return path


@pytest.fixture(scope="session")
@marks_its_tests("s3", "slow")
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


@pytest.fixture(scope="session")
@marks_its_tests("slurm", "slow")
def slurm_cluster() -> dict:
    """The two-node SLURM cluster of slurm/cluster.sh (`make test` starts it first; this starts it otherwise).

    Puts its SLURM_CONF into os.environ, so the CLI, sbatch and the jobs all find it.
    """
    conf = local_cluster(2)
    os.environ["SLURM_CONF"] = conf
    return {"conf": conf, "nodes": 2}


def _fixture_marks(item) -> set[str]:
    """The markers of every fixture the test uses, directly or through other fixtures (helpers.marks_its_tests)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {m for defs in info.name2fixturedefs.values() for d in defs for m in getattr(d.func, "_medgen_marks", ())}


def pytest_collection_modifyitems(config, items):
    """Markers from the fixtures each test uses; then files with SLURM tests first: under `make test` (-n 2
    --dist loadfile) they spend their waits on the scheduler while the other worker runs the CPU-bound files,
    instead of starting last."""
    for item in items:
        for marker in sorted(_fixture_marks(item)):
            item.add_marker(marker)
    slurm_files = {item.path for item in items if item.get_closest_marker("slurm")}
    items.sort(key=lambda item: item.path not in slurm_files)  # stable: the order within a file is kept
