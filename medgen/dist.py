"""The distributed process state that evaluate and generate share."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from medgen.atomic import write_text
from medgen.errors import UserError
from medgen.layout import RunLayout


def process_state():
    """accelerate's PartialState, on CPU when there is no GPU or ACCELERATE_USE_CPU is set.

    ``PartialState()`` alone on a CPU machine under torchrun reports ONE process per rank (every rank
    would score everything and write the output): ask for CPU explicitly and check the world size.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise UserError(f"launched as {launched} processes but accelerate sees {state.num_processes}; "
                        "use torchrun (with ACCELERATE_USE_CPU=true on CPU)")
    return state


def placement() -> dict[str, Any]:
    """Where this rank runs: host, the IP it reaches the master from, its GPU index (if SLURM gave it GPUs)."""
    env = os.environ
    rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    visible = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    return {
        "rank": rank, "world_size": int(env.get("WORLD_SIZE", "1")), "local_rank": local,
        "host": socket.gethostname(), "ip": _own_ip(env.get("MASTER_ADDR", "")),
        "gpu": visible[local] if local < len(visible) else None,  # this rank takes cuda:LOCAL_RANK of these
        "device": f"cuda:{local}" if torch.cuda.is_available() else "cpu",
        "pid": os.getpid(), "slurm_job_id": env.get("SLURM_JOB_ID"), "slurm_restarts": env.get("SLURM_RESTART_COUNT"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _own_ip(master: str) -> str:
    # the address of the interface that routes to the master: a UDP connect sends nothing
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master or socket.gethostname(), 9))
            return s.getsockname()[0]
    except OSError:
        return ""


def record_placement(run_dir: str, stage: str) -> dict[str, Any]:
    """Write ``<run.dir>/ranks/<stage>-rank-NNNNN.json`` (overwritten by a rerun) and return it."""
    where = placement()
    out = RunLayout(Path(run_dir)).ranks
    out.mkdir(parents=True, exist_ok=True)
    write_text(str(out / f"{stage}-rank-{where['rank']:05d}.json"), json.dumps(where) + "\n")
    return where
