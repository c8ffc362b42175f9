"""Credentials never leave the environment: a whole chain on the two-node SLURM cluster against a real S3
server, plus failing requests (one with the S3 client's debug logging on), and then every file the run
wrote, every object in the bucket and every line printed are searched for the access key and the secret."""
import re
import secrets
from pathlib import Path

import pytest

from tests.helpers import medgen, start_moto
from tests.test_slurm import _wait

pytestmark = [pytest.mark.slurm, pytest.mark.s3]
BUCKET = "medgen-secrets"


def _controller_address(conf: str) -> str:
    """The address the cluster's nodes reach this machine on (slurmctld's, on the nodes' bridge)."""
    text = Path(conf).read_text()
    return re.search(r"^SlurmctldHost=[^(\n]*\(([\d.]+)\)", text, re.M).group(1)


@pytest.fixture(scope="module")
def store(slurm_cluster):
    """A moto S3 server the SLURM nodes can reach, and fresh random credentials for it."""
    proc, endpoint = start_moto(_controller_address(slurm_cluster["conf"]))
    key, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    import s3fs

    fs = s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield {"fs": fs, "key": key, "secret": secret,
           "env": {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                   "AWS_DEFAULT_REGION": "us-east-1"}}
    proc.terminate()
    proc.wait(10)


def _leaks(data: bytes, needles: list[str]) -> list[str]:
    return [n for n in needles if n.encode() in data]


def test_no_credential_in_any_output(store, tmp_path):
    run, shards = tmp_path / "run", f"s3://{BUCKET}/data"
    printed: list[str] = []

    def cli(stage, *args, check=True):
        p = medgen(stage, "--config", "configs/tiny.yaml", f"run.dir={run}", f"data.shards={shards}", *args,
                   env=store["env"], check=check)
        printed.extend([p.stdout, p.stderr])
        return p

    cli("run", "--executor", "slurm")
    states = {stage: rec["State"] for stage, rec in _wait(run).items()}
    assert set(states.values()) == {"COMPLETED"}, states
    status = medgen("status", str(run), env=store["env"])
    printed.extend([status.stdout, status.stderr])

    # failing requests: a missing bucket (one line, exit 2), and the same with --debug, where the S3 client
    # logs every request's headers (the access key among them) unless medgen's logging redacts it
    missing = cli("evaluate", f"data.shards=s3://{BUCKET}-missing/data", check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert f"{BUCKET}-missing" in missing.stderr.strip().splitlines()[-1]
    debug = cli("evaluate", "--debug", f"data.shards=s3://{BUCKET}-missing/data", check=False)
    assert debug.returncode != 0
    assert "***" in debug.stderr  # the S3 client did log a credential, and it was replaced

    needles = [store["key"], store["secret"]]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("slurm" in p.parts for p in written) and any(p.suffix == ".out" for p in written)  # SLURM logs
    leaks = {str(p.relative_to(tmp_path)): _leaks(p.read_bytes(), needles) for p in written}
    objects = store["fs"].find(BUCKET)
    assert any(o.endswith("manifest.json") for o in objects) and any(o.endswith(".parquet") for o in objects)
    leaks.update({f"s3://{o}": _leaks(store["fs"].cat(o), needles) for o in objects})
    leaks.update({f"printed #{i}": _leaks(text.encode(), needles) for i, text in enumerate(printed)})
    assert not {k: v for k, v in leaks.items() if v}, "credentials found"
    assert len(written) > 20, written
