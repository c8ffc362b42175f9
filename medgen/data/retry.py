"""Riding out object-store outages: transient failures are retried with exponential backoff for a window.

The one retry protocol for every storage call that is safe to repeat as a whole (a whole-object read or
write, a manifest, a probe). One warning line when an outage starts, one info line when the store is back;
past the window a ``StorageUnavailable`` (exit 75: rerun once the store is back). URLs are redacted.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Callable, TypeVar

from medgen.data.storage import first_line, redact, redact_text
from medgen.errors import StorageUnavailable, UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS = 300.0  # default of data.retry_seconds
FIRST_DELAY, MAX_DELAY = 0.5, 15.0
# Library exception classes (matched by name along the MRO: no import of optional clients) that mean
# "the store could not be reached or did not answer", never "the store said no".
TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "HTTPClientError", "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError",
    "FSTimeoutError", "IncompleteRead", "ResponseParserError",
}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
                   "InternalError", "RequestLimitExceeded", "TooManyRequests"}


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ if e.__cause__ is not None else None if e.__suppress_context__ else e.__context__


def _transient_one(e: BaseException) -> bool:
    names = [c.__name__ for c in type(e).__mro__]
    if any("SSL" in n or "Certificate" in n for n in names):  # a TLS setup problem never heals by itself
        return False
    if isinstance(e, (ConnectionError, TimeoutError, socket.timeout)):  # refused, reset, aborted, timed out
        return True
    if any(n in TRANSIENT_NAMES for n in names):
        return True
    response = getattr(e, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or response.get("Error", {}).get("Code") in TRANSIENT_CODES
    return False


def is_transient(e: BaseException) -> bool:
    """True for failures worth retrying (no connection, reset, timeout, 5xx, throttling), False for the
    store's answers (not found, access denied, bad credentials) and for everything else.
    s3fs turns a ClientError into an OSError and keeps the original as its cause: the chain is checked."""
    if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, UserError)):
        return False
    return any(_transient_one(x) for x in _chain(e))


def unavailable(key: str, url: str, seconds: float, e: BaseException) -> StorageUnavailable:
    return StorageUnavailable(
        f"{key}: {redact(url)}: object store unreachable for {seconds:.0f} s ({_reason(e)}); "
        f"the job can be rerun (exit 75) once it is back")


def retrying(fn: Callable[[], T], key: str, url: str, window: float, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried on transient failures for up to ``window`` seconds (0.5 s doubling to 15 s);
    any other exception, or any exception when ``window`` is 0, propagates at once."""
    start, delay = None, FIRST_DELAY
    while True:
        try:
            result = fn()
        except Exception as e:
            if not is_transient(e) or window <= 0:
                raise
            now = time.monotonic()
            if start is None:
                start = now
                log.warning("object store unreachable: %s: %s; retrying for up to %g s",
                            redact(url), _reason(e), window)
            if now - start + delay > window:
                raise unavailable(key, url, now - start, e) from None
            sleep(delay)
            delay = min(2 * delay, MAX_DELAY)
        else:
            if start is not None:
                log.info("object store reachable again after %.1f s: %s", time.monotonic() - start, redact(url))
            return result


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {redact_text(first_line(e))}"
