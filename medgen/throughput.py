"""Training speed in the units a GPU user budgets with: tokens/s, model FLOPs utilisation, peak memory per rank.

FLOPs per token come from the model's shape (the same count bench/RESULTS.md uses): every weight that
multiplies activations costs 2 FLOPs per token forward and 2 for the gradient of its input; a trainable one
2 more for its own gradient; causal attention 2 x context x width per layer forward, three times that
with the backward. MFU divides achieved FLOP/s by the device's dense peak, where it is known.
"""
from __future__ import annotations

import resource

import torch

# dense bf16/fp16 tensor-core peaks per GPU (vendor data sheets, SXM parts); matched against the device name
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trainable) weights of the layers that multiply activations: linear layers, GPT-2's Conv1D and
    the (tied) output head; embeddings are lookups and cost nothing."""
    frozen = trainable = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Embedding) or not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
            continue
        n = getattr(weight, "ds_numel", None) or weight.numel()  # DeepSpeed ZeRO-3 keeps a shard locally
        if weight.requires_grad:
            trainable += n
        else:
            frozen += n
    return frozen, trainable


def flops_per_token(model: torch.nn.Module, context: int) -> float:
    """Training FLOPs per token (forward + backward) at ``context`` tokens per sequence."""
    c = model.config
    layers = getattr(c, "n_layer", None) or c.num_hidden_layers
    width = getattr(c, "n_embd", None) or c.hidden_size
    frozen, trainable = matmul_params(model)
    return 4 * frozen + 6 * trainable + 6 * layers * context * width


def device_peak(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for this precision, or None where it is not known (CPUs, fp32)."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak: allocated GPU memory, or resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def per_rank(value: float, device: torch.device) -> list[float]:
    """``value`` of every rank, in rank order (a collective: every rank must call it)."""
    from medgen.dist import is_distributed

    if not is_distributed():
        return [value]
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [float(x.item()) for x in out]
