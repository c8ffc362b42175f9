"""medgen as users install it: the wheel, built from this checkout, installed (not editable) into a fresh
virtual environment outside the checkout, then run from an empty directory that holds only a config file:
the SLURM chain on the local two-node cluster, a local `medgen run`, and `accelerate launch -m medgen train`.

The new environment gets medgen only from the wheel; its dependencies (torch, transformers, ...) come from
the test's own environment through a path file, since the tests must not download gigabytes."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.test_slurm import _jobs, _wait

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ directory of a fresh venv with the medgen wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("medgen-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a plain path line: the dependencies, without the checkout's editable medgen (its own .pth is not read)
    Path(site, "medgen-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, cwd=tmp)
    where = subprocess.run([str(py), "-c", "import medgen; print(medgen.__file__)"], capture_output=True, text=True,
                           check=True, cwd=tmp).stdout.strip()
    assert where.startswith(site), f"medgen imported from {where}, not from the wheel's install in {site}"
    return venv / "bin"


@pytest.fixture
def project(tmp_path) -> Path:
    """An empty directory with only the user's config."""
    (tmp_path / "my.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("runs/tiny", "runs/mine"))
    return tmp_path


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_installed_wheel_runs_the_slurm_chain_from_an_empty_directory(installed, project, slurm_cluster):
    _run([installed / "medgen", "run", "--executor", "slurm", "--config", "my.yaml"], project)
    run = project / "runs" / "mine"
    states = {stage: rec["State"] for stage, rec in _wait(run).items()}
    assert set(states.values()) == {"COMPLETED"}, states
    assert (run / "report" / "report.md").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    site = installed.parent / "lib"
    for stage, job in _jobs(run)["stages"].items():
        log = Path(job["logs"][0]).read_text()
        assert f"{stage}: medgen " in log and f" from {site}" in log, log[-2000:]  # the wheel's medgen, not ROOT's
    scripts = list(run.glob("slurm/**/*.sh"))
    assert scripts and not any(str(ROOT) in s.read_text() for s in scripts)  # nothing points into the checkout


@pytest.mark.slow
def test_installed_wheel_runs_locally_and_under_accelerate(installed, project):
    _run([installed / "medgen", "run", "--config", "my.yaml", "train.max_steps=2"], project)
    run = project / "runs" / "mine"
    assert (run / "report" / "report.md").is_file()
    _run([installed / "python", "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m", "medgen",
          "train", "--config", "my.yaml", "run.dir=runs/accelerate", f"data.shards={run / 'data'}",
          "train.max_steps=2"], project)
    assert (project / "runs" / "accelerate" / "adapter" / "adapter_model.safetensors").is_file()
