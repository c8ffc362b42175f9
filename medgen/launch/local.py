"""Run stages on this machine, in order, in this process."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from medgen.config import STAGES, Config

log = logging.getLogger("medgen")


def stage_fn(name: str) -> Callable[[Config], Any]:
    import importlib

    return importlib.import_module(f"medgen.{name}").run


def run_stage(name: str, cfg: Config) -> Any:
    t0 = time.time()
    log.info("%s: start", name)
    result = stage_fn(name)(cfg)
    log.info("%s: done in %.1fs", name, time.time() - t0)
    return result


def run_all(cfg: Config, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    return {name: run_stage(name, cfg) for name in stages}
