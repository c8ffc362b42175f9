"""The process's malloc (medgen/allocator.py): jemalloc preloaded by starting the process again, once, with the
environment its children see put back; the user's choice left alone; the same training either way; and glibc's
threshold for train.release_memory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from medgen import allocator
from medgen.errors import UserError
from tests.helpers import ROOT, TINY, medgen

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc: Linux")

JEMALLOC = allocator.find_jemalloc()
# CI installs it (make install); elsewhere the tests that need it say why they skip
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None and not os.environ.get("CI"),
                                    reason=f"no jemalloc on this machine ({allocator.INSTALL_HINT})")

# A program that asks for a malloc the way medgen's entry points do, then reports what it runs on: its pid, the
# malloc mapped into it, the environment it and a child see, and jemalloc's own reading of its options.
_PROGRAM = """
import ctypes, json, logging, os, subprocess, sys
from medgen import allocator
logging.basicConfig(level=logging.INFO)
print(json.dumps({"start": os.getpid()}), flush=True)
allocator.ensure(sys.argv[1])
lib = allocator.loaded()
opts = {}
if lib and "jemalloc" in lib:
    for name in ("opt.dirty_decay_ms", "opt.oversize_threshold", "opt.narenas"):
        value, size = ctypes.c_ssize_t(), ctypes.c_size_t(8)
        ctypes.CDLL(lib).mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0)
        opts[name] = value.value
child = subprocess.run(["sh", "-c", 'echo "${LD_PRELOAD-unset}|${MALLOC_CONF-unset}"'], capture_output=True, text=True)
print(json.dumps({"pid": os.getpid(), "loaded": lib, "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
                  "MALLOC_CONF": os.environ.get("MALLOC_CONF"), "child": child.stdout.strip(), "opts": opts}))
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without a preload or a MALLOC_CONF of its own, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}, **extra}


def _run(setting: str, **env: str) -> tuple[list[dict], str]:
    proc = subprocess.run([sys.executable, "-c", _PROGRAM, setting], capture_output=True, text=True, cwd=ROOT,
                          env=_env(**env), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


@needs_jemalloc
def test_auto_starts_the_process_again_once_with_jemalloc_and_its_children_see_the_old_environment():
    lines, _ = _run("auto")
    starts, end = lines[:-1], lines[-1]
    assert len(starts) == 2 and starts[0]["start"] == starts[1]["start"] == end["pid"]  # exec: once, same pid
    assert end["loaded"] == JEMALLOC
    # medgen's options, as jemalloc read them: no decay, every size from the arenas
    assert end["opts"]["opt.dirty_decay_ms"] == -1 and end["opts"]["opt.oversize_threshold"] == 0
    assert end["LD_PRELOAD"] is None and end["MALLOC_CONF"] is None and end["child"] == "unset|unset"


@needs_jemalloc
def test_a_malloc_conf_of_the_users_is_kept_and_put_back():
    lines, _ = _run("jemalloc", MALLOC_CONF="narenas:3")
    end = lines[-1]
    assert end["loaded"] == JEMALLOC and end["opts"]["opt.narenas"] == 3
    assert end["opts"]["opt.dirty_decay_ms"] != -1  # theirs replaces medgen's, it is not merged
    assert end["MALLOC_CONF"] == "narenas:3" and end["child"] == "unset|narenas:3"


@needs_jemalloc
def test_a_malloc_the_user_preloaded_is_left_alone():
    lines, err = _run("auto", LD_PRELOAD=JEMALLOC)
    assert len(lines) == 2  # not started again
    assert lines[-1]["loaded"] == JEMALLOC and lines[-1]["LD_PRELOAD"] == JEMALLOC
    assert lines[-1]["opts"]["opt.dirty_decay_ms"] != -1 and "preloaded by the environment" in err


def test_system_keeps_the_systems_malloc():
    lines, err = _run("system")
    assert len(lines) == 2 and lines[-1]["loaded"] is None and "allocator" not in err


def test_jemalloc_is_found_where_an_environment_module_puts_it(tmp_path, monkeypatch):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent:{tmp_path}")
    assert allocator.find_jemalloc() == str(lib)  # first: LD_LIBRARY_PATH, before the system's


def test_without_jemalloc_auto_warns_and_goes_on_and_jemalloc_names_what_to_install(monkeypatch, caplog):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)  # a machine without it
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    allocator.ensure("auto")  # returns: no process to start again
    assert "jemalloc not found" in caplog.text and "apt install libjemalloc2" in caplog.text
    with pytest.raises(UserError, match="run.allocator=jemalloc: no libjemalloc.so.2 .*apt install libjemalloc2"):
        allocator.ensure("jemalloc")


def _broken_jemalloc(folder, kind: str) -> None:
    lib = folder / "libjemalloc.so.2"
    if kind == "not a library":
        lib.write_bytes(b"")
        return
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a library that crashes every process it is preloaded into")
    src = folder / "boom.c"
    src.write_text("#include <stdlib.h>\n__attribute__((constructor)) static void boom(void) { abort(); }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)


@pytest.mark.parametrize("kind", ["not a library", "crashes at start-up"])
def test_a_jemalloc_that_cannot_run_is_tried_first_and_never_replaces_the_process(tmp_path, kind):
    _broken_jemalloc(tmp_path, kind)  # found first: LD_LIBRARY_PATH
    lines, err = _run("auto", LD_LIBRARY_PATH=str(tmp_path))
    assert len(lines) == 2 and lines[-1]["loaded"] is None  # the process went on, on the system's malloc
    assert f"allocator: {tmp_path / 'libjemalloc.so.2'} " in err and "the system's malloc instead" in err, err
    reason = "cannot be preloaded" if kind == "not a library" else "fails a Python start-up (exit -6"
    assert reason in err, err
    proc = subprocess.run([sys.executable, "-c", "from medgen import allocator; allocator.ensure('jemalloc')"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(LD_LIBRARY_PATH=str(tmp_path)))
    assert proc.returncode != 0 and "UserError: run.allocator=jemalloc: " in proc.stderr and reason in proc.stderr


@pytest.mark.slow
@needs_jemalloc
def test_training_on_jemalloc_is_bit_for_bit_the_training_on_the_systems_malloc(tmp_path):
    data = tmp_path / "data"
    medgen("prepare", *TINY, f"run.dir={tmp_path}", "-q")
    adapters = {}
    for setting in ("auto", "system"):
        proc = medgen("train", *TINY, f"run.dir={tmp_path / setting}", f"data.shards={data}",
                      f"run.allocator={setting}", "lora.dropout=0.05")
        assert ("allocator: jemalloc" in proc.stderr) == (setting == "auto"), proc.stderr[-2000:]
        record = json.loads((tmp_path / setting / "adapter" / "medgen_config.json").read_text())
        assert record["resolved"]["malloc"] == (JEMALLOC if setting == "auto" else "system")
        adapters[setting] = load_file(tmp_path / setting / "adapter" / "adapter_model.safetensors")
        losses = [json.loads(line).get("loss") for line in (tmp_path / setting / "train_log.jsonl").open()]
        adapters[setting]["losses"] = [x for x in losses if x is not None]
    a, b = adapters["auto"], adapters["system"]
    assert a.keys() == b.keys() and a["losses"] == b["losses"] and len(a["losses"]) > 0
    assert all(a[k].equal(b[k]) for k in a if k != "losses")


# Frees 40 blocks of 8 MB with a small block kept after each, after one 16 MB block was freed: glibc's default
# threshold has then grown past 8 MB, so the blocks came from the heap and the small ones pin it.
_FRAGMENT = """
import sys, torch
from medgen import allocator
print(allocator.release_freed_memory() if sys.argv[1] == "on" else "off")
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
x = torch.ones(4 << 20)  # 16 MB, freed: glibc raises its threshold
del x
before = rss()
big, small = [], []
for _ in range(40):
    big.append(torch.ones(2 << 20))  # 8 MB each, touched
    small.append(torch.ones(16 << 10))  # 64 KB
del big
print(round(rss() - before))
"""


@pytest.mark.parametrize("setting", ["on", "off"])
def test_release_memory_gives_freed_blocks_back_to_the_system_under_glibc(setting):
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, setting], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    kept_mb = int(out[1])
    if setting == "on":
        assert out[0] == "True" and kept_mb < 40  # the 320 MB freed went back; the small blocks stay
    else:
        assert kept_mb > 250  # glibc's default keeps them: what the setting is for


def test_release_memory_leaves_the_users_choice_alone():
    code = "from medgen import allocator; print(allocator.release_freed_memory())"
    # a preload that does not exist is skipped by the loader (one warning): only medgen's reading of it is tested
    cases = [{"MALLOC_MMAP_THRESHOLD_": "65536"}, {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}]
    if JEMALLOC:
        cases.append({"LD_PRELOAD": JEMALLOC})  # loaded: glibc's malloc is not the one in use
    for extra in cases:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **extra})
        assert out.stdout.strip() == "False", extra


@needs_jemalloc
def test_the_medgen_command_starts_again_with_jemalloc_but_cli_main_called_by_a_program_does_not(tmp_path):
    args = ["train", *TINY, f"run.dir={tmp_path}", f"data.shards={tmp_path / 'none'}"]  # fails fast: no shards
    caller = ("import os, sys; from medgen import allocator, cli; print(os.getpid(), flush=True); "
              f"code = cli.main({args!r}); print(allocator.loaded()); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", caller], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=_env())
    assert proc.returncode == 2 and len(proc.stdout.split()) == 2 and proc.stdout.split()[1] == "None", proc.stdout
    assert "allocator" not in proc.stderr  # another program's process: left as it is
    proc = medgen(*args, check=False)
    assert proc.returncode == 2 and f"allocator: jemalloc ({JEMALLOC}" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("medgen: error:")
