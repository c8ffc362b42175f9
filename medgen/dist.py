"""The distributed process state that evaluate and generate share."""
from __future__ import annotations

import os

import torch

from medgen.errors import UserError


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
