"""Replace a file or a directory all at once: built under a temporary name beside the target, flushed and
fsynced, then renamed into place. Until that rename the previous target is untouched; on any failure the
temporary is removed. Files may be local paths or fsspec URLs (object stores: temporary key, then move);
directories are local.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import fsspec


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def write_text(path: str | os.PathLike, text: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), fs)


def write_bytes(path: str | os.PathLike, data: bytes, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Replace the file at ``path`` (a local path or fsspec URL; a path within ``fs`` when given) with ``data``."""
    if fs is None:
        fs, path = fsspec.core.url_to_fs(str(path))
    path = str(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if is_local(fs):
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
        else:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
    except BaseException:
        _remove(fs, tmp)
        raise


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(Exception):  # best effort: the first error is the one to report
        if fs.exists(path):
            fs.rm(path)


@contextlib.contextmanager
def directory(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a new, empty directory beside ``target``; when the block ends without error it takes
    ``target``'s place (``commit_dir``), else it is removed and ``target`` stays as it was.
    ``replace=False``: an existing ``target`` (another process's, as good as ours) is kept instead."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        commit_dir(tmp, target, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_dir(tmp: str | os.PathLike, target: str | os.PathLike, replace: bool = True) -> None:
    """fsync every file of the finished directory ``tmp``, then put it in ``target``'s place in one step
    (the old one, if any, stays complete until then and is removed after)."""
    tmp, target = Path(tmp), Path(target)
    _fsync_tree(tmp)
    if replace and target.exists():
        if not _exchange(tmp, target):  # no atomic exchange here: move the old one aside for a moment
            aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, aside)
            os.rename(tmp, target)
            os.rename(aside, tmp)
        _fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old copy
        return
    try:
        os.rename(tmp, target)
    except OSError:
        if replace or not target.exists():
            raise
        return  # replace=False and another process got there first: theirs stays
    _fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(d)


def _fsync_dir(d: str | os.PathLike) -> None:
    """Make renames and new entries in ``d`` durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
