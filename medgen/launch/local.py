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
    from medgen import preflight, tracking, watchdog

    preflight.check(cfg, (name,))  # before the stage's module is even imported
    t0 = time.time()
    log.info("%s: start", name)
    dog = watchdog.start(cfg, name)  # a rank that stops making progress is reported, then exit 75
    try:
        with process_globals_restored(), tracking.stage(cfg, name):  # MLflow / W&B, where configured (rank 0)
            result = stage_fn(name)(cfg)
    finally:
        if dog:
            dog.stop()
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


def status(run_dir: str) -> tuple[str, int]:
    """A run directory run on this machine (``medgen run`` or one stage at a time): what each stage left."""
    from pathlib import Path

    from medgen import provenance
    from medgen.checkpoint import Checkpoints
    from medgen.errors import UserError
    from medgen.layout import RunLayout

    layout = RunLayout(Path(run_dir))
    if not layout.root.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    rows = []
    manifest = layout.root / "data" / "manifest.json"  # data.shards' default; elsewhere it is the config's
    rows.append(("prepare", "finished" if manifest.exists() else "-", str(manifest) if manifest.exists() else ""))
    for stage in STAGES[1:]:
        rec = provenance.read(layout, stage)
        if layout.finished(stage):
            resolved = (rec or {}).get("resolved", {})
            what = f"step {resolved['adapter_step']}, " if stage == "train" and "adapter_step" in resolved else ""
            rows.append((stage, "finished", f"{what}{(rec or {}).get('written', '')} {layout.marker(stage)}".strip()))
        elif stage == "train" and (newest := Checkpoints(layout.checkpoints, 0).newest()):
            rows.append((stage, "stopped", f"checkpoint {newest} (the next medgen train/run resumes from it)"))
        else:
            rows.append((stage, "-", ""))
    found = [r for r in rows if r[1] != "-"]
    if not found:
        raise UserError(f"{run_dir}: nothing of a medgen run here (no prepared data, checkpoint or stage output)")
    lines = [f"{run_dir}: run on this machine (no SLURM submission)", f"  {'stage':<9} {'state':<9} output"]
    lines += [f"  {s:<9} {st:<9} {out}".rstrip() for s, st, out in rows]
    return "\n".join(lines), 0
