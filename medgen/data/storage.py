"""Storage failures on any fsspec URL as one-line errors that name the config key, the URL and the remedy.

One mapping for every place that touches storage (the source CSV, the shards, the manifest, the prompts),
so the same mistake reads the same wherever it happens. URLs are shown without credentials or query.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Any, Iterator

from medgen.errors import UserError

# Client libraries whose exceptions mean "the object store said no", not "medgen has a bug".
STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure")
CREDENTIALS = "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
# Libraries whose non-I/O exceptions are about the data itself, never the storage it came from.
DATA_MODULES = ("pyarrow", "pandas", "numpy")
# botocore's own defaults (60 s timeouts, 5 attempts, under s3fs's 5 retries) take up to 25 minutes to notice
# a stalled store; medgen retries outages itself (medgen/data/retry.py), so one attempt fails fast.
S3_CLIENT_DEFAULTS = {"connect_timeout": 10, "read_timeout": 20, "retries": {"total_max_attempts": 1}}


def fs_options(url: str, storage_options: dict) -> dict:
    """``storage_options`` plus bounded client timeouts for s3:// (each only where the user set none)."""
    if not url.startswith(("s3://", "s3a://")):
        return storage_options
    config = {**S3_CLIENT_DEFAULTS, **storage_options.get("config_kwargs", {})}
    return {**storage_options, "config_kwargs": config}


def is_local(url: str) -> bool:
    """A path on this machine (no scheme, or file://), which validation can check at once."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def is_glob(url: str) -> bool:
    """Whether a data.source entry is a pattern (``*``, ``?``, ``[...]``) rather than one file."""
    return any(ch in url for ch in "*?[")


def redact(url: str) -> str:
    """The URL without user:password@ and without a query string (which may carry a signature)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    host = host.rpartition("@")[2]
    return f"{scheme}://{host}{slash}{path.split('?')[0]}"


def redact_text(text: str) -> str:
    """Every URL in ``text`` (a client library's message) without user:password@ and query string."""
    return re.sub(r"([a-z][a-z0-9+.-]*://)([^\s/\"'@]*@)?([^\s?\"']*)(\?[^\s\"']*)?", r"\1\3", text)


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def storage_error(e: Exception, key: str, url: str) -> Exception:
    """An object-store client's exception as a one-line UserError naming the URL and the remedy;
    any other exception is returned unchanged (a bug, not a user mistake)."""
    if type(e).__module__.split(".")[0] not in STORAGE_MODULES:
        return e
    name = type(e).__name__
    if "Credentials" in name:
        remedy = (f"no credentials found: set {CREDENTIALS} (or a profile / instance role) in the environment")
    elif "Connect" in name or "Endpoint" in name:
        remedy = f"cannot reach the object store ({first_line(e)}); check AWS_ENDPOINT_URL and the network"
    else:
        remedy = f"{name}: {first_line(e)}"
    return UserError(f"{key}: {redact(url)}: {remedy}")


def url_to_fs(key: str, url: str, storage_options: dict) -> tuple[Any, str]:
    """fsspec's filesystem and path for ``url``; an unknown protocol, a missing filesystem package or bad
    options is one line naming ``key`` (mapped here, where it happens, not around whole blocks of work)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **fs_options(url, storage_options))
    except (ValueError, ImportError, TypeError) as e:
        raise UserError(f"{key}: cannot use {redact(url)}: {first_line(e)}") from None


@contextlib.contextmanager
def storage_errors(key: str, url: str, writing: bool = False) -> Iterator[None]:
    """Turn a storage failure (missing file or bucket, bad credentials, read-only path, a store never
    reached) into one UserError; outages are retried inside it (medgen/data/retry.py)."""
    try:
        yield
    except Exception as e:
        raise mapped(e, key, url, writing) from None


def mapped(e: Exception, key: str, url: str, writing: bool = False) -> Exception:
    """The one-line UserError for a storage failure; anything else (a bug, a data error) unchanged."""
    if type(e).__module__.split(".")[0] in DATA_MODULES and not isinstance(e, OSError):
        return e  # a schema or data error (pyarrow's are ValueErrors): a bug to show, not a URL to blame
    if isinstance(e, FileNotFoundError):
        if writing:
            return UserError(f"{key}: {redact(url)} does not exist (no such bucket or directory); "
                             f"create it or fix {key}")
        return UserError(f"{key}: not found: {redact(url)}; check the path "
                         f"(for s3:// the bucket, the key and AWS_ENDPOINT_URL)")
    if isinstance(e, PermissionError):
        return UserError(f"{key}: access denied to {redact(url)} ({first_line(e)}); "
                         f"check the credentials in the environment ({CREDENTIALS})")
    if isinstance(e, OSError):
        if e.errno in NO_SPACE:
            return no_space(url, key, "a rerun writes it again")
        verb = "write to" if writing else "read"
        return UserError(f"{key}: cannot {verb} {redact(url)}: {first_line(e)}")
    return storage_error(e, key, url)  # the object-store client's own errors (no credentials, ...)


# --------------------------------------------------------------------------- full disk

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def is_no_space(e: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``e`` (or an exception it came from) is a full disk or quota. torch's C++ writer reports
    one as a bare RuntimeError: for that, whether the filesystem of ``path`` has under 1 MiB left."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in NO_SPACE or any(t in str(cur).lower() for t in NO_SPACE_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return path is not None and isinstance(e, (OSError, RuntimeError)) and _free_bytes(Path(path)) < 1 << 20


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def no_space(path: str | os.PathLike, what: str, kept: str) -> UserError:
    return UserError(f"{redact(str(path))}: no space left on device while writing {what}; free space and rerun ({kept})")


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike, what: str, kept: str) -> Iterator[None]:
    """A full disk or quota while writing ``what`` to ``path``: one UserError naming the path and what is kept."""
    try:
        yield
    except Exception as e:
        if isinstance(e, UserError) or not is_no_space(e, path):
            raise
        raise no_space(path, what, kept) from None
