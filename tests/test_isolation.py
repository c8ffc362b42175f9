"""Two runs in one process (a notebook, a test) do not see each other's settings: running a stage leaves
no environment variable, RNG state, warning filter, log handler or logger level behind."""
import logging
import os
import random
import warnings

import numpy as np
import pytest
import torch

from medgen import cli
from medgen.logs import NOISY


def _globals() -> dict:
    return {
        "env": dict(os.environ), "warnings": list(warnings.filters), "handlers": list(logging.getLogger().handlers),
        "levels": {name: logging.getLogger(name).level for name in ("", *NOISY)},
        "torch_rng": torch.get_rng_state().tolist(), "python_rng": random.getstate(),
        "numpy_rng": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()],
    }


def _changed(before: dict, after: dict) -> dict:
    out = {k: (before[k], after[k]) for k in before if k != "env" and before[k] != after[k]}
    env = {k for k in set(before["env"]) | set(after["env"]) if before["env"].get(k) != after["env"].get(k)}
    return {**out, **({"env": sorted(env)} if env else {})}


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_two_runs_in_one_process_leave_nothing_behind(tmp_path):
    torch.manual_seed(1234)  # a caller's own RNG state, which must survive both runs
    before = _globals()
    assert cli.main(["run", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'a'}"]) == 0
    assert _changed(before, _globals()) == {}
    assert cli.main(["train", "--config", "configs/tiny.yaml", "-q", f"run.dir={tmp_path / 'b'}",
                     f"data.shards={tmp_path / 'a' / 'data'}", "train.max_steps=2"]) == 0
    assert _changed(before, _globals()) == {}
    # each run's TensorBoard events in its own run folder (a process-wide log dir sent b's into a's)
    assert len(list((tmp_path / "a" / "tensorboard").iterdir())) == 1
    assert len(list((tmp_path / "b" / "tensorboard").iterdir())) == 1
