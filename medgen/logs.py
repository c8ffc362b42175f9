"""Logging for every entry point (the CLI and the SLURM tasks): one format, quiet libraries, and no
credential ever written out, whatever a library logs at debug level."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
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
    handler = logging.StreamHandler(_AboveBars())
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_not_an_orphaned_connection_error)
    handler.addFilter(RedactSecrets([os.environ.get(v, "") for v in SECRET_VARIABLES]))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    env = {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
           **({"TQDM_DISABLE": "1"} if quiet else {}),  # read by tqdm and tokenizers when they start work
           # the hub's and transformers' bars ("Loading weights"), read when they are imported: in a job log
           # they were carriage-return lines between medgen's
           **({"HF_HUB_DISABLE_PROGRESS_BARS": "1"} if quiet or not _is_terminal(sys.stderr) else {}),
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


DEFAULT_EVERY = 30.0  # seconds between progress lines: run.progress_every's default (medgen/config/schema.py)
# Held while the timer thread writes a progress line, and by a fork (prepare's worker pool) while it forks: a
# child never starts with the stream's lock held by a thread it does not have.
_WRITING = threading.Lock()
os.register_at_fork(before=_WRITING.acquire, after_in_parent=_WRITING.release, after_in_child=_WRITING.release)


class Progress:
    """A long loop's progress, the one home for it in every stage: a tqdm bar where stderr is a terminal; where it
    is not (a SLURM job log, a pipe) log lines instead, never both. The lines: one at the start, one every
    ``every`` seconds from a timer thread (whether or not the loop advanced: a slow batch or a stalled read
    still shows), one at the end; each with what is done (of the total, when known), the other counts, a rate and
    the time left. ``total=None``: unknown, no time left. ``unit="bytes"`` is shown in MB. ``totals``: the totals
    of other counts; ``rate``: the count whose rate is shown (the unit's by default); ``ends=False``: no start
    and end lines (a caller that logs its own outcome). A context manager: the end line only after success.
    """

    def __init__(self, what: str, total: float | None, unit: str, every: float = DEFAULT_EVERY, *,
                 totals: dict[str, int] | None = None, rate: str | None = None, ends: bool = True,
                 leave: bool = True, logger: str = "medgen", stream=None):
        self.what, self.total, self.unit, self.every, self.rate, self.ends = what, total, unit, every, rate, ends
        self.totals = dict(totals or {})
        self.counts = dict.fromkeys([*self.totals, *([rate] if rate else [])], 0)  # shown from the first line
        self.done = 0
        self.log = logging.getLogger(logger)
        stream = stream or sys.stderr
        shown = self.log.isEnabledFor(logging.INFO)  # --quiet: neither lines nor a bar
        self.bar = _bar(what, total, unit, leave, stream) if shown and _is_terminal(stream) else None
        self.lines = shown and self.bar is None
        self.t0 = time.monotonic()  # again on entering: the rate and time left are the loop's own
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._timer = threading.Thread(target=self._tick, name="medgen-progress", daemon=True)

    def __enter__(self) -> "Progress":
        self.t0 = time.monotonic()
        if self.lines:
            if self.ends:
                self.log.info("%s", self._head(start=True))
            self._timer.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._timer.is_alive():
            self._timer.join()
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.ends and exc_type is None:
            self.log.info("%s, done in %.1f s", self._line(), time.monotonic() - self.t0)

    def update(self, n: float = 0, **counts: int) -> None:
        """``n`` more of the unit done, and ``counts`` more of each other count (tokens=..., rows=...)."""
        from medgen import watchdog

        watchdog.progress(self.what)  # the loop advanced: the rank is not hung (medgen/watchdog.py)
        with self._lock:  # the timer thread's line sees all of one update or none of it
            self.done += n
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0) + v
        if self.bar is not None:
            self.bar.update(n)
            if self.counts:
                self.bar.set_postfix(self.counts, refresh=False)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                line = self._line(eta=True)
            with _WRITING:
                self.log.info("%s", line)

    def _head(self, start: bool = False) -> str:
        done, label = _amount(self.done, self.unit)
        head = f"{self.what}: {done}/{_amount(self.total, self.unit)[0]} {label}" if self.total is not None \
            else f"{self.what}: {done} {label}"
        parts = [f"{v}/{self.totals[k]} {k}" if k in self.totals else f"{v} {k}"
                 for k, v in self.counts.items() if not start or k in self.totals]
        return ", ".join([head, *parts])

    def _line(self, eta: bool = False) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        if self.rate:
            rate = f"{self.counts.get(self.rate, 0) / elapsed:.0f} {self.rate}/s"
        else:
            rate = "{} {}/s".format(*_amount(self.done / elapsed, self.unit))
        parts = [self._head(), rate]
        if eta and self.total is not None and self.done > 0:
            parts.append(f"about {_duration(elapsed * max(self.total - self.done, 0) / self.done)} left")
        return ", ".join(parts)


class _AboveBars:
    """stderr for log lines: while a tqdm bar is on the terminal, a line is written above it (tqdm clears the
    bar and draws it again below), not into the middle of it. Looked up at each write, as a process (a test) may
    swap sys.stderr. Not in a forked child (prepare's workers): the bars it inherited are its parent's, and so
    may be the state of tqdm's lock."""

    def __init__(self):
        self.pid = os.getpid()

    def write(self, text: str) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None and len(tqdm.tqdm._instances) and os.getpid() == self.pid:
            tqdm.tqdm.write(text, file=sys.stderr, end="")
        else:
            sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or a stream-like object without a file behind it
        return False


def _bar(what: str, total: float | None, unit: str, leave: bool, stream, initial: float = 0):
    from tqdm.auto import tqdm

    if unit == "bytes":
        return tqdm(total=total, desc=what, unit="B", unit_scale=True, leave=leave, file=stream, initial=initial)
    return tqdm(total=total, desc=what, unit=f" {unit}", leave=leave, file=stream, initial=initial)


class Steps:
    """Training's progress, on rank 0: a line per logged step (the step of the total, the loss, the rate and the
    time left; the numbers train_log.jsonl holds in full), and a bar of the steps where stderr is a terminal. The
    lines come in a job log and on a terminal alike (there above the bar): they are the run's numbers, not only
    its progress; train.logging_steps spaces them. The time left is this process's: the steps it trained and the
    time they took, validation and checkpoints included."""

    def __init__(self, total: int, done: int, logger: str = "medgen", stream=None):
        self.total, self.done0, self.log = total, done, logging.getLogger(logger)
        stream = stream or sys.stderr
        self.shown = self.log.isEnabledFor(logging.INFO)
        self.bar = _bar("train", total, "steps", True, stream, initial=done) if self.shown and _is_terminal(stream) \
            else None
        self.t0 = time.monotonic()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def logged(self, step: int, numbers: dict) -> None:
        if self.shown:
            took = time.monotonic() - self.t0
            left = took / (step - self.done0) * (self.total - step) if step > self.done0 else None
            self.log.info("%s", step_line(step, self.total, numbers, left))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def step_line(step: int, total: int, numbers: dict, left: float | None) -> str:
    """One logged training step, for a person: ``numbers`` are the step's logs (the Trainer's and medgen's);
    what a step did not log is left out."""
    n = numbers
    parts = [f"train: step {step}/{total}", f"loss {n['loss']:.4f}"]
    for key, text in (("grad_norm", "grad norm {:.3g}"), ("learning_rate", "lr {:.3g}"),
                      ("mean_token_accuracy", "token accuracy {:.3f}"), ("entropy", "entropy {:.3f}"),
                      ("tokens_per_s", "{:.0f} tokens/s"), ("train_fraction", "epoch {:.2f}"),
                      ("peak_memory_gb", "peak memory {:.2f} GB")):
        if isinstance(n.get(key), int | float):
            parts.append(text.format(n[key]))
    if isinstance(n.get("mfu"), int | float):
        parts.append(f"MFU {100 * n['mfu']:.1f}%")
    if left:
        parts.append(f"about {_duration(left)} left")
    return ", ".join(parts)


def _amount(x: float, unit: str) -> tuple[str, str]:
    """A number of ``unit`` as shown, and its label: bytes in MB with one decimal, others whole."""
    return (f"{x / 1e6:.1f}", "MB") if unit == "bytes" else (f"{x:.0f}", unit)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
