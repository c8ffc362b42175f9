"""Run stages on this machine, in order, in this process."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import warnings
from typing import Any, Callable, Iterator

from medgen.config import STAGES, Config

log = logging.getLogger("medgen")


def stage_fn(name: str) -> Callable[[Config], Any]:
    import importlib

    return importlib.import_module(f"medgen.{name}").run


def run_stage(name: str, cfg: Config) -> Any:
    from medgen import preflight

    preflight.check(cfg, (name,))  # before the stage's module is even imported
    t0 = time.time()
    log.info("%s: start", name)
    with process_globals_restored():
        result = stage_fn(name)(cfg)
    log.info("%s: done in %.1fs", name, time.time() - t0)
    return result


@contextlib.contextmanager
def process_globals_restored() -> Iterator[None]:
    """What a stage's libraries change for the whole process (the Trainer seeds every global RNG, accelerate
    and DeepSpeed read and set environment variables, libraries add warning filters) is put back when the
    stage ends, so the next stage or run in this process starts from the same state."""
    import numpy as np
    import torch

    env = dict(os.environ)
    py_rng, np_rng = random.getstate(), np.random.get_state()
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with warnings.catch_warnings(), torch.random.fork_rng(devices=gpus):
        try:
            yield
        finally:
            random.setstate(py_rng)
            np.random.set_state(np_rng)
            for k in set(os.environ) - set(env):
                del os.environ[k]
            os.environ.update(env)


def run_all(cfg: Config, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    from medgen import preflight

    preflight.check(cfg, stages)  # the prompts of the last stage before the first one runs
    return {name: run_stage(name, cfg) for name in stages}
