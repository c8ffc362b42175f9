"""Shard integrity: every shard train or evaluate reads is checked against the manifest before any row of it
is used; a changed shard is one line naming it, what was expected and what was found, exit 2."""
import json
import shutil

import pytest

from medgen.data.shards import shard_refs
from medgen.data.stream import PackedStream, iter_shard, load_articles
from medgen.errors import UserError
from tests.helpers import medgen

TRAIN, TEST = "train/part-00000-of-00002.parquet", "test/part-00001-of-00002.parquet"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One tiny prepared dataset (the bundled demo data); each test changes a copy of it."""
    run = tmp_path_factory.mktemp("integrity")
    medgen("prepare", "--config", "configs/tiny.yaml", "-q", f"run.dir={run}")
    return run / "data"


def _copy(dataset, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dataset, run / "data")
    return run


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _replace(path):  # another valid shard of the same split and dataset
    other = path.with_name(path.name.replace("part-00000", "part-00001") if "part-00000" in path.name
                           else path.name.replace("part-00001", "part-00000"))
    shutil.copyfile(other, path)


def _one_line_naming(proc, shard: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medgen:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    line = errors[0]
    assert line.startswith(f"medgen: error: data.shards: shard {shard} does not match the manifest: "), line
    assert "expected" in line and "found" in line and "re-run `medgen prepare`" in line
    return line


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_changed_shard_stops_train_and_evaluate_before_any_row_is_used(dataset, tmp_path):
    run = _copy(dataset, tmp_path)
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    for rel in (TRAIN, TEST):
        _flip(run / "data" / rel)
    args = ["--config", "configs/tiny.yaml", "-q", f"run.dir={run}", "train.max_steps=1"]

    line = _one_line_naming(medgen("train", *args, check=False), f"{run / 'data'}/{TRAIN}")
    entry = next(e for e in manifest["splits"]["train"]["shards"] if e["path"] == TRAIN)
    assert f"expected {entry['bytes']} bytes sha256 {entry['sha256'][:16]}" in line
    assert f"found {entry['bytes']} bytes sha256 " in line  # same size, other content
    assert not (run / "samples").exists() and not (run / "adapter").exists()  # no training step happened

    _one_line_naming(medgen("evaluate", *args, "model.base_only=true", check=False), f"{run / 'data'}/{TEST}")
    assert not (run / "eval").exists()


def test_every_shard_of_an_untouched_dataset_passes(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    for split in ("train", "validation", "test"):  # every shard prepare writes (empty ones too) matches its entry
        assert len(load_articles(str(dataset), manifest, {}, split)) == manifest["splits"][split]["articles"]


# the s3 case asks for the s3_server fixture at run time (request.getfixturevalue), so it is marked here
@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=[pytest.mark.s3, pytest.mark.slow])])
@pytest.mark.parametrize("change", [_flip, _truncate, _replace], ids=["flipped-byte", "truncated", "replaced"])
def test_no_row_of_a_changed_shard_is_read(dataset, tmp_path, change, where, request):
    run = _copy(dataset, tmp_path)
    url = str(run / "data")
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    entry = next(e for e in manifest["splits"]["train"]["shards"] if e["path"] == TRAIN)
    change(run / "data" / TRAIN)
    found = (run / "data" / TRAIN).stat().st_size
    if where == "s3":  # the changed dataset as objects on the S3 server
        import s3fs

        url = f"s3://{request.getfixturevalue('s3_server')['bucket']}/changed-{tmp_path.name}"
        s3fs.S3FileSystem().put(str(run / "data"), url, recursive=True)
    rows = iter_shard(shard_refs(url, manifest, "train")[0], {}, ["input_ids"])
    with pytest.raises(UserError, match="does not match the manifest") as e:
        next(rows)
    assert f"expected {entry['bytes']} bytes sha256 {entry['sha256'][:16]}" in str(e.value)
    assert f"found {found} bytes sha256 " in str(e.value) and (found < entry["bytes"]) == (change is _truncate)
    stream = iter(PackedStream(url, manifest, {}, 64, 50256, "wrapped", 1, 0, 1))
    with pytest.raises(UserError, match=f"shard {url}/{TRAIN} does not match"):
        next(stream)


def test_changed_object_on_s3_is_one_line_exit_2(dataset, tmp_path, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    url = f"s3://{s3_server['bucket']}/integrity-{tmp_path.name}"
    fs.put(str(dataset), url, recursive=True)
    assert fs.exists(f"{url}/manifest.json")
    data = bytearray(fs.cat(f"{url}/{TRAIN}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(f"{url}/{TRAIN}", bytes(data))
    run = tmp_path / "run"
    proc = medgen("train", "--config", "configs/tiny.yaml", "-q", f"run.dir={run}", f"data.shards={url}",
                  "train.max_steps=1", check=False)
    line = _one_line_naming(proc, f"{url}/{TRAIN}")
    assert f"found {len(data)} bytes" in line
    assert s3_server["env"]["AWS_SECRET_ACCESS_KEY"] not in proc.stderr
    assert not (run / "samples").exists() and not (run / "adapter").exists()
