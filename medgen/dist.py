"""Distributed start-up, in one place: every way a stage starts (one process, torchrun / accelerate launch,
DeepSpeed without a GPU, a SLURM task) goes through ``init_distributed``; a SLURM task first turns SLURM's
variables into torch's (``from_slurm``). No other module touches accelerate's state or its environment
variables, and every failure here is a ``DistributedError`` (one line, exit 2).

Also here: where each rank runs (``record_placement``), for the job logs and the placement tests.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from medgen.atomic import write_text
from medgen.errors import DistributedError
from medgen.layout import RunLayout


def deepspeed_requested(deepspeed_config: str) -> bool:
    """train.deepspeed, or a DeepSpeed preset of ``accelerate launch`` (it sets ACCELERATE_USE_DEEPSPEED)."""
    from accelerate.utils import parse_flag_from_env

    return bool(deepspeed_config) or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def on_cpu() -> bool:
    """No GPU here, or the launch asked for the CPU (ACCELERATE_USE_CPU, as accelerate's --cpu sets it)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def init_distributed(deepspeed: bool = False, timeout: datetime.timedelta | None = None):
    """accelerate's shared PartialState for this process, started once (later calls join it), checked against
    the world size the launcher announced (WORLD_SIZE), which it must match. ``timeout``: the process group's,
    for every collective (watchdog.pg_timeout: longer than the watchdog's, so the watchdog reports a hang first).

    - One process, torchrun, accelerate launch, a SLURM task: on the CPU when ``on_cpu()``. ``PartialState()``
      alone on a CPU machine under torchrun reports ONE process per rank (every rank would do all the work).
    - DeepSpeed without a GPU: accelerate's CPU mode switches DeepSpeed off without a word (it would train
      plain DDP), and without it accelerate finds no backend and every rank believes it is alone. So: the
      state on gloo with DeepSpeed declared; the Trainer reuses it (its accelerator_config
      use_configured_state, train.sft_config).
    """
    from accelerate import PartialState

    if deepspeed and not torch.cuda.is_available():
        from accelerate.utils import parse_flag_from_env

        if parse_flag_from_env("ACCELERATE_USE_CPU"):
            raise DistributedError("DeepSpeed does not run with ACCELERATE_USE_CPU set (accelerate would train plain "
                                   "DDP instead); unset it: without a GPU medgen runs DeepSpeed on the CPU itself")
        if "LOCAL_RANK" not in os.environ:  # gloo needs the process group a launcher describes
            raise DistributedError("DeepSpeed on CPU: start medgen with torchrun or accelerate launch")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        state = PartialState(backend="gloo", **({"timeout": timeout} if timeout else {}))
    else:
        state = PartialState(cpu=on_cpu(), **({"timeout": timeout} if timeout else {}))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise DistributedError(f"launched as {launched} processes but accelerate sees {state.num_processes}; "
                               "use torchrun (with ACCELERATE_USE_CPU=true on CPU)")
    return state


# Linux's default ephemeral ports start at 32768 (net.ipv4.ip_local_port_range): below it, no outgoing connection
# of another process on the node holds the port rank 0 listens on
RENDEZVOUS_PORTS = range(20000, 32768)


def rendezvous_port(job_id: str) -> int:
    """The port rank 0's rendezvous listens on, the same in every task of the job (derived from its id; a
    requeued job keeps it). submitit's own choice, 20000-60000, falls in the ephemeral range: a connection of
    another job on the node once held it, and the job failed with EADDRINUSE."""
    return RENDEZVOUS_PORTS[int(hashlib.sha256(job_id.encode()).hexdigest(), 16) % len(RENDEZVOUS_PORTS)]


def from_slurm(distributed: bool, timeout: datetime.timedelta | None = None) -> None:
    """In a SLURM task (one task per rank, started by srun, never torchrun): threads for the cores SLURM gave
    the task; for train/evaluate/generate, RANK/WORLD_SIZE/MASTER_* exported from SLURM's variables
    (multi-node too), then the shared state started. CUDA_VISIBLE_DEVICES stays as SLURM set it (all GPUs of
    the node): each rank takes cuda:LOCAL_RANK."""
    import logging

    import submitit

    # torch would start a thread per core of the node in every task: use the cores SLURM gave this task
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    if not distributed:
        return
    os.environ["MASTER_PORT"] = str(rendezvous_port(os.environ.get("SLURM_JOB_ID", "")))
    # overwrite: variables inherited from the submitting shell must not win over SLURM's
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    logging.getLogger("medgen").info("rank %d of %d (local %d), master %s:%d", env.rank, env.world_size,
                                     env.local_rank, env.master_addr, env.master_port)
    init_distributed(timeout=timeout)


def is_distributed() -> bool:
    """Whether a process group is up (collectives must then be called on every rank)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


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
