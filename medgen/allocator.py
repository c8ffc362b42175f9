"""The process's memory allocator, in one place (``run.allocator``; no torch import here).

A CPU training step allocates and frees tens of GB in large blocks (65 GB per SmolLM2 step at 8 x 1024 tokens).
glibc's malloc keeps the freed blocks in a fragmented heap: its resident memory peaked at 1.5x what was live, and
fixing its mmap threshold (``release_freed_memory``) gives the memory back but page-faults every block in again
(1.3-1.4x slower steps). jemalloc with decay off and every size in its arenas (``JEMALLOC_CONF``) reuses freed
pages without faulting them in again: at 8 x 1024 tokens the peak was 0.43-0.44x of the previous main's on GPT-2
124M and SmolLM2-135M, and the step 1.1-1.3x faster than on glibc (bench/RESULTS.md). The same numbers either
way: PyTorch aligns its CPU tensors itself (64 bytes), whatever malloc returns.

A malloc is chosen before a process starts (LD_PRELOAD), so ``ensure`` runs the process again, once, with
jemalloc preloaded (``os.execve``: same pid, same arguments and open files), where run.allocator asks for it and
the library is found; the re-executed process puts LD_PRELOAD and MALLOC_CONF back as they were, so programs it
starts (sbatch, git, a compiler) do not inherit it. Only entry points call ``ensure``: the ``medgen`` command
line (not ``cli.main([...])`` called in a process of someone else's), a SLURM task (submitit's runner).
A malloc the user preloaded (jemalloc, tcmalloc, mimalloc) is left alone, and so is a MALLOC_CONF of theirs.
The library found is tried first in a child Python (``_trial``): one the loader refuses, or one that crashes a
start-up, is named in a warning and not used; the process is never replaced by one that cannot run.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger("medgen")

# oversize_threshold:0: every size from the arenas (jemalloc's default maps >= 8 MiB blocks anew each time);
# decay -1: freed pages are kept for reuse, never purged and faulted in again (PyTorch's CPU launcher,
# torch.backends.xeon.run_cpu, also keeps them: decay 9e9 ms). With jemalloc's defaults: 1.8x slower steps.
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
INSTALL_HINT = "Debian/Ubuntu: apt install libjemalloc2; RHEL: dnf install jemalloc; conda: conda install jemalloc"
MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")
_RESTORE = "MEDGEN_ALLOCATOR_RESTORE"  # set for the re-executed process: what LD_PRELOAD and MALLOC_CONF were
MMAP_THRESHOLD = 1 << 20  # bytes: glibc maps and unmaps blocks this large or larger, never keeps them
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def loaded() -> str | None:
    """The file of the malloc replacement mapped into this process (jemalloc, tcmalloc, mimalloc), else None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        name = os.path.basename(path)
        if any(name.startswith(f"lib{m}") for m in MALLOCS):
            return path
    return None


def preloaded() -> str | None:
    """A malloc replacement the environment chose: the one mapped into this process, or one LD_PRELOAD names."""
    named = os.environ.get("LD_PRELOAD", "")
    return loaded() or (named if any(m in named for m in MALLOCS) else None)


def _search_dirs() -> list[Path]:
    """Where a user's jemalloc is: LD_LIBRARY_PATH (an environment module), the Python environment (conda,
    a venv), then the system's library directories."""
    dirs = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    dirs += [os.path.join(p, "lib") for p in (os.environ.get("CONDA_PREFIX"), sys.prefix, sys.base_prefix) if p]
    arch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    dirs += [f"/usr/local/lib/{arch}", "/usr/local/lib", f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/usr/lib"]
    return [Path(d) for d in dict.fromkeys(dirs)]


def find_jemalloc() -> str | None:
    """The path of a jemalloc shared library on this machine, or None."""
    for d in _search_dirs():
        for name in JEMALLOC_NAMES:
            if (d / name).is_file():
                return str(d / name)
    try:  # the loader's cache: wherever ldconfig was told to look
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.split(" ")[0] in JEMALLOC_NAMES and Path(path).is_file():
            return path
    return None


def ensure(setting: str) -> None:
    """Make this process run on the malloc ``setting`` (run.allocator) asks for: may replace the process by itself
    with jemalloc preloaded (never returns then). auto: jemalloc where found, else the system's malloc and a
    warning; jemalloc: a UserError where it is not found; system: the system's malloc."""
    from medgen.errors import UserError

    restore = os.environ.pop(_RESTORE, None)
    if restore is not None:  # the re-executed process
        for key, value in json.loads(restore).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        conf = os.environ.get("MALLOC_CONF") or JEMALLOC_CONF  # put back: the user's, if they had one
        if lib := loaded():
            log.info("allocator: jemalloc (%s, MALLOC_CONF=%s)", lib, conf)
        else:  # the loader refused it (another architecture, a broken file): once is enough
            log.warning("allocator: jemalloc could not be preloaded (see the loader's message above); the system's "
                        "malloc holds up to 2x the memory of a CPU training step (run.allocator=system: no attempt)")
        return
    if setting == "system":
        return
    if other := preloaded():
        log.info("allocator: %s, preloaded by the environment", other)
        return
    lib = find_jemalloc()
    if lib is None:
        if setting == "jemalloc":
            raise UserError(f"run.allocator=jemalloc: no {JEMALLOC_NAMES[0]} in LD_LIBRARY_PATH, {sys.prefix}/lib or "
                            f"the system's libraries ({INSTALL_HINT}); or run.allocator=auto")
        log.warning("allocator: jemalloc not found (%s); the system's malloc holds up to 2x the memory of a CPU "
                    "training step (bench/RESULTS.md). run.allocator=system silences this", INSTALL_HINT)
        return
    if not sys.executable:  # an embedded interpreter: no command to start again
        return
    old = {k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF")}
    env = {**os.environ, _RESTORE: json.dumps(old), "LD_PRELOAD": " ".join(filter(None, [lib, old["LD_PRELOAD"]]))}
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)  # a MALLOC_CONF of the user's is theirs
    if problem := _trial(env):  # this process must not be replaced by one that cannot start
        if setting == "jemalloc":
            raise UserError(f"run.allocator=jemalloc: {lib} {problem}; another build of jemalloc, or run.allocator=auto")
        log.warning("allocator: %s %s; the system's malloc instead (run.allocator=system silences this)", lib, problem)
        return
    log.info("allocator: starting again with %s preloaded (run.allocator=%s)", lib, setting)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _trial(env: dict[str, str]) -> str | None:
    """None if this Python starts and imports numpy with ``env``'s preload; else what went wrong. A library the loader
    cannot preload is skipped with a message, and some builds crash at start-up (conda's jemalloc >= 5.2.1 with
    numpy: jemalloc issue #2472); a tenth of a second, once per command."""
    env = {k: v for k, v in env.items() if k != _RESTORE}
    try:
        proc = subprocess.run([sys.executable, "-c", "import numpy"], env=env, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return "preloaded, hangs a Python start-up (120 s)"
    except OSError as e:
        return f"could not be tried ({e})"
    said = " ".join(proc.stderr.split())[-300:]
    if proc.returncode != 0:
        return f"preloaded, fails a Python start-up (exit {proc.returncode}{': ' + said if said else ''})"
    if "cannot be preloaded" in proc.stderr:
        return f"cannot be preloaded ({said})"
    return None


def release_freed_memory() -> bool:
    """Have glibc's malloc give blocks of 1 MiB and more back to the system when they are freed (mallopt
    M_MMAP_THRESHOLD, which also stops glibc from raising the threshold by itself); True if set. The least
    resident memory under glibc, at the cost of a page fault per 4 KB of every large block allocated afterwards
    (``train.release_memory``, for run.allocator=system or where jemalloc is missing).

    Left alone where the user chose: ``MALLOC_MMAP_THRESHOLD_`` in the environment, or another malloc in this
    process (jemalloc, tcmalloc, mimalloc: glibc's would not be the one in use); and where there is no glibc."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or preloaded():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
