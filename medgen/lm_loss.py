"""The training loss, without work nobody asked for.

TRL's SFTTrainer scores the next token through its fused LM head (trl.trainer.utils.add_fused_lm_head), which
never materialises the whole [tokens, vocab] logits but recomputes each tile of them in backward; on every
micro-batch it also computes each position's entropy and top-1 hit over the full vocabulary, gathers both and the
token count from every rank (three collectives) and reads them on the host (a device sync), for its `entropy` and
`mean_token_accuracy` log keys. On a CPU its tiles are folded with generic tensor operations: in a profile of one
GPT-2 124M step (bench/RESULTS.md) the head took about half of the step and most of its peak memory.

medgen's loss (``train.token_metrics=false``, the default) is the same quantity, the sum of the targets' negative
log-likelihoods over the number of loss-carrying tokens, computed by ``NextTokenNLL``: a block of rows at a time,
the block's logits, their log-sum-exp and, in the same pass, the gradient with respect to the hidden states
(softmax minus one-hot, times the head's weight), so that backward has nothing to recompute and only one block of
logits ever exists. The frozen head needs no weight gradient. It is the same math in a different order of
floating-point operations: the adapter after N steps equals the previous kernel's within rounding (measured in
bench/RESULTS.md), and 1 vs 2 processes, resume and sweeps stay bit for bit equal among themselves
(tests/test_train.py, tests/test_sweep.py).

Where it does not apply, TRL's own loss runs: ``train.token_metrics=true`` (entropy and accuracy wanted), a head
that trains (its weight needs a gradient), logits scaled or soft-capped by the model's config, and DeepSpeed
ZeRO-3 (the head's weight is partitioned; TRL gathers it).
"""
from __future__ import annotations

import functools
import types

import torch

ROWS = 256  # rows (tokens) per block: [256, 50257] fp32 logits are 51 MB (GPT-2); bench/RESULTS.md


class NextTokenNLL(torch.autograd.Function):
    """sum_i -log softmax(hidden_i @ weight.T + bias)[target_i] for a frozen head, in blocks of ``rows`` rows;
    the gradient with respect to ``hidden`` is computed in forward, in fp32, and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                rows: int) -> torch.Tensor:
        device = hidden.device.type
        # the matrix products in the precision the rest of the model runs in (bf16 under autocast), the
        # softmax and every sum in fp32
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight.to(dtype)
        b = None if bias is None else bias.float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for s in range(0, hidden.shape[0], rows):
                t = targets[s:s + rows]
                logits = torch.mm(hidden[s:s + rows].to(dtype), w.t()).float()
                if b is not None:
                    logits += b
                lse = torch.logsumexp(logits, dim=1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
                probs[torch.arange(len(t), device=t.device), t] -= 1  # d(lse - target logit) / d logits
                grad[s:s + rows] = torch.mm(probs.to(dtype), w).float()
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total).to(ctx.hidden_dtype), None, None, None, None


def install(model, deepspeed_zero3: bool) -> bool:
    """Give the transformers model under ``model`` (peft-wrapped or not) a ``medgen_nll=True`` forward that
    returns (sum of the targets' NLL, number of targets) through ``NextTokenNLL``; False where it does not apply
    (see the module's docstring) and TRL's loss must run."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    head = base.get_output_embeddings()
    text = base.config.get_text_config()
    scaled = any(getattr(text, k, None) not in (None, 1.0) for k in
                 ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling"))
    trains_head = any(p.requires_grad for p in head.parameters())
    if deepspeed_zero3 or scaled or trains_head or not hasattr(base, base.base_model_prefix):
        return False
    original = base.forward

    # the model's own signature kept: generate() checks its arguments against it
    @functools.wraps(type(base).forward)
    def forward(self, *args, medgen_nll: bool = False, labels=None, **kwargs):
        if not medgen_nll:
            return original(*args, **({"labels": labels} if labels is not None else {}), **kwargs)
        kwargs["use_cache"] = False
        # the body and head looked up at each call: peft and accelerate may wrap them after this
        hidden = getattr(self, self.base_model_prefix)(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        out = self.get_output_embeddings()
        nll = NextTokenNLL.apply(hidden[keep], out.weight, out.bias, targets[keep], ROWS)
        return nll, keep.sum()

    base.forward = types.MethodType(forward, base)
    return True


def loss(trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
    """The micro-batch's loss as TRL's SFT loss defines it: the targets' NLL summed, over the loss-carrying tokens
    of the micro-batch, or of the whole step on every rank (``num_items_in_batch``) when the Trainer passes it."""
    nll, tokens = model(**inputs, medgen_nll=True)
    value = nll / torch.as_tensor(tokens if num_items_in_batch is None else num_items_in_batch).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        value = value * (trainer.accelerator.num_processes // trainer.get_tp_size())  # DDP averages the gradients
    return value
