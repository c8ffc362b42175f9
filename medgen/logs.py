"""Logging for every entry point (the CLI and the SLURM tasks): one format, quiet libraries, and no
credential ever written out, whatever a library logs at debug level."""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Iterator

# Environment variables whose values must never appear in a log line (botocore, for one, logs request
# headers, the access key among them, at debug level).
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
                    "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
                    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN", "WANDB_API_KEY")
NOISY = ("transformers", "datasets", "accelerate", "peft", "trl", "DeepSpeed", "torch.distributed", "mlflow", "wandb", "alembic")


class RedactSecrets(logging.Filter):
    """Replaces the values of the credential variables in every record with '***'."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            clean = text
            for s in self.secrets:
                clean = clean.replace(s, "***")
            if clean != text:
                record.msg, record.args = clean, ()
        return True


FORMAT = "%(asctime)s medgen %(levelname)s %(message)s"


def _not_an_orphaned_connection_error(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task exception was never retrieved" about an HTTP write that an outage cut short
    (aiohttp, under s3fs): the failed request itself is retried or reported in one line; its orphaned task is noise."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (record.name == "asyncio" and isinstance(exc, ConnectionError | OSError)
                and "never retrieved" in record.getMessage())


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def logging_for(quiet: bool, debug: bool) -> Iterator[None]:
    """Log lines, library verbosity, warning filters and progress bars for one command. Everything is put back
    on exit, so two commands run in one process (tests, notebooks) do not see each other's settings."""
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", *NOISY)}
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_not_an_orphaned_connection_error)
    handler.addFilter(RedactSecrets([os.environ.get(v, "") for v in SECRET_VARIABLES]))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    env = {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
           **({"TQDM_DISABLE": "1"} if quiet else {}),  # read by tqdm and tokenizers when they start work
           # transformers sets its loggers' level when it is first imported, after this: its own variable
           # keeps notices such as the PAD-token alignment out (a user's TRANSFORMERS_VERBOSITY wins)
           **({} if debug else {"TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")})}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with warnings.catch_warnings():
            if not debug:  # known-noisy library messages; errors still surface
                for name in NOISY:
                    logging.getLogger(name).setLevel(logging.ERROR)
                # DeepSpeed resets its logger's level when imported (after this) and logs "Setting accelerator to
                # CPU" on every CPU rank: a filter on the logger survives that, and it logs on this logger only
                logging.getLogger("DeepSpeed").addFilter(_errors_only)
                warnings.filterwarnings("ignore", category=FutureWarning)
                warnings.filterwarnings("ignore", category=UserWarning)
            yield
    finally:
        root.removeHandler(handler)
        logging.getLogger("DeepSpeed").removeFilter(_errors_only)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Progress:
    """A long loop's progress as log lines, for job logs (tqdm turns itself off where stderr is not a terminal):
    a line at the start, at most one every ``every`` seconds, and one at the end, each with what is done of the
    total, tokens per second and the time left."""

    def __init__(self, what: str, total: int, unit: str, every: float = 30.0, logger: str = "medgen",
                 quiet: bool = False):
        self.what, self.total, self.unit, self.every, self.quiet = what, total, unit, every, quiet
        self.log = logging.getLogger(logger)
        self.done = self.tokens = 0
        self.t0 = self.last = time.monotonic()
        if not quiet:
            self.log.info("%s: 0/%d %s", what, total, unit)

    def update(self, n: int, tokens: int = 0) -> None:
        from medgen import watchdog

        watchdog.progress(self.what)  # the loop advanced: the rank is not hung (medgen/watchdog.py)
        self.done += n
        self.tokens += tokens
        now = time.monotonic()
        if self.quiet:
            return
        if self.done >= self.total:
            self.log.info("%s: %d/%d %s, %d tokens, %.0f tokens/s, done in %.1f s", self.what, self.done, self.total,
                          self.unit, self.tokens, self.tokens / max(now - self.t0, 1e-9), now - self.t0)
        elif now - self.last >= self.every:
            self.last = now
            left = (now - self.t0) * (self.total - self.done) / self.done
            self.log.info("%s: %d/%d %s, %d tokens, %.0f tokens/s, about %s left", self.what, self.done, self.total,
                          self.unit, self.tokens, self.tokens / (now - self.t0), _duration(left))


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
