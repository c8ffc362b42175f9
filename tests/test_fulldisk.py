"""A full disk (issue #14.3): the previous complete output stays and is used next, one line names the path.

The disk is a small tmpfs mounted for the test (CI runs as root) and filled with a ballast file that
leaves just the room wanted; deleting the ballast "frees space" for the rerun. Plus the atomic-write helper.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import fsspec
import pytest
from safetensors.torch import load_file

from medgen import atomic, generate
from medgen.data import storage
from tests.helpers import REFERENCE_STEPS, REFERENCE_TRAIN, ROOT, TINY, medgen

PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path):
    """mount(dir, size): a tmpfs of that many bytes at dir, unmounted after the test."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the full-disk tests mount a tmpfs and must run as root in CI")
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(path: Path, size: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=True)


def fill(fs_dir: Path, leave: int) -> Path:
    """A ballast file that takes all but ``leave`` bytes of the filesystem (whole pages) at fs_dir."""
    st = os.statvfs(fs_dir)
    size = st.f_bavail * st.f_frsize - leave
    ballast = fs_dir / "ballast"
    with open(ballast, "wb") as f:
        for start in range(0, size, 1 << 20):
            f.write(b"\0" * min(1 << 20, size - start))
    return ballast


def pages(path: Path) -> int:
    """Bytes a tmpfs needs for the files under path."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in path.rglob("*") if p.is_file())


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_one_line(proc: subprocess.CompletedProcess, path: Path) -> str:
    """Exit 2, no traceback, and one error line naming path and 'no space left'."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = re.findall(r"medgen: error: .*", proc.stderr)  # a progress bar may share its line
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"{path}:" in errors[0] and "no space left" in errors[0], errors[0]
    return errors[0]


def no_temps(d: Path) -> None:
    assert not [p.name for p in d.iterdir() if ".tmp" in p.name or ".old" in p.name]


# --------------------------------------------------------------------------- the atomic-write helper


@pytest.mark.parametrize("where", ["local", "file-url", "memory"])
def test_write_replaces_the_whole_file(tmp_path, where):
    path = {"local": str(tmp_path / "f.json"), "file-url": f"file://{tmp_path}/f.json",
            "memory": f"memory://fulldisk-{os.getpid()}/f.json"}[where]
    atomic.write_text(path, "old")
    atomic.write_text(path, "new ü")
    fs, plain = fsspec.core.url_to_fs(path)
    assert fs.cat(plain) == "new ü".encode()
    assert fs.ls(os.path.dirname(plain), detail=False) == [plain]


def test_a_failed_file_write_leaves_the_old_file_and_no_temp(tmp_path, tmpfs, monkeypatch):
    d = tmpfs(tmp_path / "fs", 16 * PAGE)
    atomic.write_text(d / "f", "old")
    with pytest.raises(OSError) as e:
        atomic.write_bytes(d / "f", b"x" * 32 * PAGE)
    assert e.value.errno == errno.ENOSPC
    assert (d / "f").read_text() == "old" and os.listdir(d) == ["f"]
    mem = f"memory://fulldisk-fail-{os.getpid()}/f"
    atomic.write_text(mem, "old")
    fs, plain = fsspec.core.url_to_fs(mem)
    monkeypatch.setattr(type(fs), "mv", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "boom")))
    with pytest.raises(OSError):
        atomic.write_text(mem, "new")
    assert fs.cat(plain) == b"old" and fs.ls(os.path.dirname(plain), detail=False) == [plain]


@pytest.mark.parametrize("exchange", [True, False])
def test_directory_replaces_the_old_one_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # a filesystem without renameat2(RENAME_EXCHANGE): old one moved aside for a moment
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    for text in ("one", "two"):
        with atomic.directory(target) as tmp:
            (tmp / "a").write_text(text)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "b").write_text(text)
        assert snapshot(target) == {"a": text.encode(), "sub/b": text.encode()}
    no_temps(tmp_path)
    with atomic.directory(target, replace=False) as tmp:  # another writer's complete copy stays
        (tmp / "a").write_text("three")
    assert (target / "a").read_text() == "two"
    no_temps(tmp_path)


def test_a_failed_directory_leaves_the_old_one_and_no_temp(tmp_path, tmpfs):
    d = tmpfs(tmp_path / "fs", 16 * PAGE)
    with atomic.directory(d / "out") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic.directory(d / "out") as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("the writer failed")
    with pytest.raises(OSError) as e, atomic.directory(d / "out") as tmp:
        (tmp / "a").write_bytes(b"x" * 32 * PAGE)
    assert storage.is_no_space(e.value)
    assert snapshot(d / "out") == {"a": b"old"} and os.listdir(d) == ["out"]


def test_disk_errors_is_one_line_naming_the_path(tmp_path, tmpfs):
    d = tmpfs(tmp_path / "fs", 4 * PAGE)
    with pytest.raises(storage.UserError) as e, storage.disk_errors(d / "x", "a test file", "nothing kept"):
        (d / "x").write_bytes(b"x" * 8 * PAGE)
    assert str(e.value) == f"{d / 'x'}: no space left on device while writing a test file; free space and rerun " \
                           "(nothing kept)"
    with pytest.raises(ValueError), storage.disk_errors(d, "a test file", "nothing kept"):
        raise ValueError("not a disk problem")


# --------------------------------------------------------------------------- train


def _train(run_dir: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    """The reference run's settings (a checkpoint every 2 steps, LoRA dropout on: resuming restores its RNG),
    keeping one checkpoint."""
    return medgen("train", *TINY, f"run.dir={run_dir}", f"data.shards={shards}", *REFERENCE_TRAIN,
                  "train.keep_checkpoints=1", *extra, check=False, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def reference(reference_run) -> Path:
    """The shared undisturbed run (conftest.reference_run)."""
    return reference_run


def test_checkpoint_on_a_full_disk_keeps_the_last_and_the_rerun_resumes_exactly(tmp_path, tmpfs, tiny_run, reference):
    ckpt = pages(reference / "checkpoints" / f"step-{REFERENCE_STEPS}")
    run_dir = tmp_path / "run"
    disk = tmpfs(run_dir / "checkpoints", 64 * ckpt)
    ballast = fill(disk, ckpt * 3 // 2)  # room for the step-2 checkpoint, not for step 4 beside it
    proc = _train(run_dir, tiny_run / "data")
    assert_one_line(proc, disk / "checkpoint-4")
    assert [p.name for p in disk.glob("*-*")] == ["step-2"]  # the partial checkpoint-4 is removed
    assert (disk / "step-2" / "medgen.json").exists() and not (run_dir / "adapter").exists()
    ballast.unlink()
    proc = _train(run_dir, tiny_run / "data")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {disk / 'step-2'}" in proc.stderr
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (run_dir, reference))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    same = [(d / "samples" / "rank-00000.jsonl").read_text() for d in (run_dir, reference)]
    assert same[0] == same[1]  # every step trained once, on the same blocks


def test_adapter_on_a_full_disk_keeps_the_previous_one(tmp_path, tmpfs, tiny_run, reference):
    run_dir = tmpfs(tmp_path / "run", 16 << 20)
    for name in ("checkpoints", "adapter", "samples"):  # a finished run: the rerun only saves the adapter again
        shutil.copytree(reference / name, run_dir / name)
    before = snapshot(run_dir / "adapter")
    ballast = fill(run_dir, 16 * PAGE)
    proc = _train(run_dir, tiny_run / "data")
    assert_one_line(proc, run_dir / "adapter")
    assert snapshot(run_dir / "adapter") == before
    no_temps(run_dir)
    ballast.unlink()
    proc = _train(run_dir, tiny_run / "data")  # resumes from the last step's checkpoint: trains nothing more
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = snapshot(run_dir / "adapter")
    assert after["adapter_model.safetensors"] == before["adapter_model.safetensors"]
    config = [json.loads(x["adapter_config.json"]) for x in (before, after)]
    for c in config:  # peft writes this set in hash order, which differs from process to process
        c["target_modules"] = sorted(c["target_modules"])
    assert config[0] == config[1]


def test_merged_model_on_a_full_disk_keeps_the_previous_one(tmp_path, tmpfs, tiny_run):
    from medgen import config, models, train

    cfg = config.load_config(str(ROOT / "configs/tiny.yaml"), [f"run.dir={tmp_path}"])
    tok = models.load_tokenizer("tiny-gpt2")
    disk = tmpfs(tmp_path / "disk", 64 << 20)
    train._save_merged(cfg, tiny_run / "adapter", tok, disk / "merged")
    before = snapshot(disk / "merged")
    ballast = fill(disk, 1 << 20)
    with pytest.raises(storage.UserError) as e:
        train._save_merged(cfg, tiny_run / "adapter", tok, disk / "merged")
    assert str(e.value).startswith(f"{disk / 'merged'}: no space left") and "\n" not in str(e.value)
    assert snapshot(disk / "merged") == before
    no_temps(disk)
    ballast.unlink()
    train._save_merged(cfg, tiny_run / "adapter", tok, disk / "merged")
    assert snapshot(disk / "merged") == before


# --------------------------------------------------------------------------- evaluate, report


@pytest.mark.parametrize("stage,folder", [("evaluate", "eval"), ("report", "report")])
def test_eval_and_report_on_a_full_disk_keep_the_previous_output(tmp_path, tmpfs, tiny_run, stage, folder):
    run_dir = tmpfs(tmp_path / "run", 16 << 20)
    for name in ("adapter", "eval", "generations", "report"):
        shutil.copytree(tiny_run / name, run_dir / name)
    shutil.copy(tiny_run / "train_log.jsonl", run_dir)
    before = snapshot(run_dir / folder)
    fill(run_dir, 0)
    proc = medgen(stage, "--config", "configs/tiny.yaml", f"run.dir={run_dir}", f"data.shards={tiny_run / 'data'}",
                  check=False)
    assert_one_line(proc, run_dir / folder)
    assert snapshot(run_dir / folder) == before
    no_temps(run_dir)


# --------------------------------------------------------------------------- generate


def test_generate_on_a_full_disk_continues_exactly_once(tmp_path, tmpfs, tiny_run):
    prompts = tmp_path / "p.jsonl"
    rows = [{"id": f"q{i:02d}", "prompt": f"Story number {i} begins with"} for i in range(24)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmpfs(tmp_path / "run", 4 << 20)
    shutil.copytree(tiny_run / "adapter", run_dir / "adapter")
    (run_dir / "generations").mkdir()
    ballast = fill(run_dir, 3 * PAGE)  # job.json and a few batches of completions
    # the run's own completions only: the base model's set (generate.base_prompts) is the same code path
    args = ["generate", "--config", "configs/tiny.yaml", f"run.dir={run_dir}", f"generate.prompts={prompts}",
            "generate.batch_size=2", "generate.max_new_tokens=4", "generate.base_prompts=0"]
    part = run_dir / "generations" / "part-00000-of-00001.jsonl"
    assert_one_line(medgen(*args, check=False), part)
    data = part.read_bytes()
    lines, good = generate._parse_part(data)
    assert good == len(data) and 0 < len(lines) < len(rows)  # whole lines only
    assert not (run_dir / "generations" / "generations.jsonl").exists()
    ballast.unlink()
    medgen(*args)
    final = [json.loads(x) for x in (run_dir / "generations" / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in final] == [r["id"] for r in rows]
    keys = [k for k, _ in generate._parse_part(part.read_bytes())[0]]
    assert sorted(keys) == sorted((r["id"], 0) for r in rows)  # none done twice
