"""What a training step keeps in memory for backward.

A LoRA step's memory is the activations autograd saves for backward (the frozen model's weights are a fraction
of it: at 8 x 1024 tokens, SmolLM2-135M saves 7 GB for 0.5 GB of weights). fused_swiglu and shared_lora_input
keep the step's numbers: the same forward values and gradients, bit for bit (tests/test_memory.py compares them
against the unchanged model); fused_gelu is the same function with other rounding. bench/RESULTS.md has the
measurements. How much of the memory a step frees the process holds on to is the allocator's (medgen/allocator.py).

- ``fused_gelu`` (GPT-2): ``gelu_new`` is five tensor operations, each saved for backward; torch's fused tanh GELU
  is the same function in one (other rounding: within 5e-7 in fp32, one bf16 ulp).
- ``fused_swiglu`` (Llama-family MLPs): ``down(silu(gate(x)) * up(x))`` saved gate, silu(gate) and up; the fused
  product saves gate and up and recomputes silu(gate) in backward, with the same kernels (bit for bit).
- ``shared_lora_input``: under autocast every LoRA A matrix casts its layer input to bf16 and saves that copy;
  q, k and v (and gate and up) read the same input, so three (two) identical copies were saved. They now share
  one, and each branch's gradient is still cast back and summed in fp32, as autocast's own casts do (bit for bit).
"""
from __future__ import annotations

import inspect
import logging
import types
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def fused_gelu(model) -> int:
    """Replace GPT-2's ``gelu_new`` (the tanh-approximate GELU written as five tensor operations, each kept for
    backward: the largest activations of a training step) by torch's fused kernel of the same function
    (``F.gelu(approximate="tanh")``); the number replaced. Same function, other rounding: within 5e-7 of each other
    on [-50, 50] in fp32 (3e-8 relative), one bf16 ulp under bf16; 5x faster on a CPU (bench/RESULTS.md).
    Modules, not the config: the saved config stays the model's own."""
    from transformers.activations import ACT2FN, NewGELUActivation

    replaced = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])
                replaced += 1
    return replaced


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving gate and up only: silu(gate) is recomputed in backward (one elementwise kernel)
    instead of kept. The gradients are the ones autograd computes for the two operations, with the same kernels:
    d up = grad * silu(gate); d gate = silu_backward(grad * up, gate)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


# The Llama-family MLP whose forward fused_swiglu replaces: its one statement, as transformers writes it.
_SWIGLU = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_swiglu(module) -> bool:
    from transformers.activations import SiLUActivation

    if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) or \
            type(getattr(module, "act_fn", None)) not in (SiLUActivation, torch.nn.SiLU):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    body = [line.strip() for line in source.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
    # ``down_proj = <expr>; return down_proj`` or ``return <expr>``: nothing else in the forward
    return body in (["down_proj = " + _SWIGLU, "return down_proj"], ["return " + _SWIGLU])


def fused_swiglu(model) -> int:
    """Run every Llama-family MLP (exactly ``down(silu(gate(x)) * up(x))``) through ``SiluMul``; the number of
    MLPs changed. An instance's forward, not the class's: evaluate and generate load their own model."""
    changed = 0
    for module in model.modules():
        if _is_swiglu(module):
            module.forward = types.MethodType(_swiglu_forward, module)
            changed += 1
    return changed


class SharedCast(torch.autograd.Function):
    """One reader's view of ``copy``, the autocast-dtype copy of ``x`` made once for all its readers. Backward casts
    this reader's gradient back to x's dtype, as autocast's own cast (ToCopyBackward) does, so the readers'
    gradients still add up in x's precision."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class _LastCast:
    """A forward pre-hook for LoRA A layers: their input as a view of one shared autocast-dtype copy. The copy of
    the last input seen is kept (q, k and v, or gate and up, read the same input one after the other); a new
    input, or the same one changed in place, gets a new copy."""

    def __init__(self):
        self.source = self.copy = None  # weakrefs: to the input, and to its copy (alive while a graph saves it)
        self.version = -1

    def __call__(self, module, args):
        x = args[0]
        device = x.device.type
        if not (torch.is_grad_enabled() and torch.is_autocast_enabled(device) and x.is_floating_point()):
            return None
        dtype = torch.get_autocast_dtype(device)
        if x.dtype == dtype or not isinstance(module, torch.nn.Linear):
            return None
        copy = self.copy() if self.copy is not None else None
        if copy is None or self.source() is not x or self.version != x._version:
            copy = x.detach().to(dtype)
            self.source, self.version, self.copy = weakref.ref(x), x._version, weakref.ref(copy)
        return (SharedCast.apply(x, copy), *args[1:])


def shared_lora_input(model) -> int:
    """Give every LoRA A layer under ``model`` (after peft wrapped it) the shared-cast pre-hook; the number of
    layers. Without autocast, with no gradient, or for inputs already in the autocast dtype it does nothing."""
    from peft.tuners.lora import LoraLayer

    hook, hooked = _LastCast(), 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for a in module.lora_A.values():
                a.register_forward_pre_hook(hook)
                hooked += 1
    return hooked


# --------------------------------------------------------------------------- a step that does not fit


def is_out_of_memory(e: BaseException) -> bool:
    """A GPU's out-of-memory error, or a CPU allocation that failed (torch's allocator under a job's address-space
    limit, or Python's own). The kernel's OOM killer leaves no error to catch: the job log ends and SLURM says
    OUT_OF_MEMORY."""
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _where(device: torch.device) -> str:
    """The device that ran out, as the line names it: a GPU with its memory and this process's peak on it."""
    if device.type != "cuda":
        return "the CPU (an allocation was refused: the machine's memory, or the process's limit, ulimit -v)"
    index = device.index or 0
    return (f"{torch.cuda.get_device_name(index)} ({torch.cuda.get_device_properties(index).total_memory / 2**30:.1f}"
            f" GiB, {torch.cuda.max_memory_allocated(index) / 2**30:.1f} GiB allocated at the peak)")


def scoring_out_of_memory(device: torch.device, batch: int, context: int) -> str:
    """One line for evaluate's scoring that did not fit: fewer windows a pass first (the perplexity does not depend
    on them), then shorter windows (which changes what is measured)."""
    fix = (f"set eval.batch_size={batch // 2} (the perplexity does not depend on it)" if batch > 1 else
           "a shorter eval.context (other windows: a perplexity not comparable with runs at this context)")
    return (f"evaluate: out of memory on {_where(device)} scoring {batch} windows of up to {context} tokens a pass "
            f"(eval.batch_size x eval.context): {fix}")


def generation_out_of_memory(device: torch.device, prompt_tokens: int, new_tokens: int) -> str:
    """One line for a prompt that does not fit alone (generate halves its batch down to one prompt first)."""
    return (f"generate: out of memory on {_where(device)} with one prompt of {prompt_tokens} tokens and up to "
            f"{new_tokens} new ones: a shorter prompt or generate.max_new_tokens")


def training_out_of_memory(args, kept: str) -> str:
    """One line for a training step that did not fit, with the settings that make it fit: the micro-batch halved
    and the accumulation doubled (the same sequences per optimizer step, so the same training within rounding;
    a resumed run keeps its global batch and takes the new micro-batch, medgen/elastic.py), else what shrinks a
    single sequence's memory. ``args``: the Trainer's arguments; ``kept``: what a rerun starts from."""
    batch, accum, length = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_length
    fixes = []
    if batch > 1:
        smaller = max(b for b in range(1, batch) if batch % b == 0)
        fixes.append(f"set train.batch_size={smaller} train.grad_accum={accum * batch // smaller} (the same {batch * accum} "
                     "sequences per step per process: the same training within rounding)")
    if not args.gradient_checkpointing:
        fixes.append("train.gradient_checkpointing=true (activations recomputed in backward: ~30% slower)")
    fixes.append("a shorter train.max_length" + (", or lora.top_layers" if batch == 1 else ""))
    return (f"train: out of memory on {_where(args.device)} in a micro-batch of {batch} x {length} tokens (train.batch_size x "
            f"train.max_length): {'; or '.join(fixes)}; {kept}")
