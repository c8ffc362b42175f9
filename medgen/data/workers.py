"""An ordered, bounded parallel map over chunks for prepare's per-article work (concurrent.futures).

Results come back in input order whatever the number of workers, so the order-dependent decisions made
from them are the same; at most ``IN_FLIGHT_PER_WORKER`` chunks per worker are queued or running, so
memory stays flat whatever the input size. One worker runs the work in this process, without a pool.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

from medgen.errors import UserError

T = TypeVar("T")
R = TypeVar("R")

TOKENIZER_THREADS = "TOKENIZERS_PARALLELISM"
IN_FLIGHT_PER_WORKER = 3  # one running, two waiting: a worker never idles while the reader catches up


def available_cpus() -> int:
    """The CPUs this process may run on; inside a SLURM job no more than its --cpus-per-task."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cpus, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cpus


def resolve(workers: int) -> int:
    """``data.workers``: 0 means every CPU this process may use."""
    return workers if workers > 0 else available_cpus()


_work: Callable | None = None


def _start_worker(work: Callable) -> None:
    global _work
    # one thread per worker: the Rust tokenizer's own thread pool would oversubscribe the cores
    os.environ[TOKENIZER_THREADS] = "false"
    _work = work


@contextlib.contextmanager
def _one_tokenizer_thread() -> Iterator[None]:
    """data.workers=1 means one core, in this process too (the tokenizer reads this variable on every call)."""
    before = os.environ.get(TOKENIZER_THREADS)
    os.environ[TOKENIZER_THREADS] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TOKENIZER_THREADS, None)
        else:
            os.environ[TOKENIZER_THREADS] = before


def _run(chunk):
    return _work(chunk)


def imap_ordered(work: Callable[[T], R], chunks: Iterable[T], workers: int) -> Iterator[R]:
    """``map(work, chunks)`` on ``workers`` processes, in order; ``chunks`` is read only as workers free up."""
    if workers <= 1:
        with _one_tokenizer_thread():
            yield from map(work, chunks)
        return
    # fork: the workers inherit the loaded tokenizer and language model instead of loading them again
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(work,))
    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_run, chunk))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise UserError(f"a prepare worker process died (killed by the system: out of memory?); "
                        f"lower data.workers (now {workers}) or give the job more memory") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
