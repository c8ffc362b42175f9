"""What a training step keeps in memory (medgen/memory.py): fewer saved activations, bit for bit the same step."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from medgen import memory

TOKENS = (3, 40)  # micro-batch: 3 sequences of 40 tokens
LLAMA = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=300)


def _lora(model, patched: bool, fan_in_fan_out: bool = False):
    """``model`` (a copy) with LoRA on every linear layer, B non-zero so every gradient flows; patched: with
    medgen's activation savers installed where build_trainer installs them."""
    model = copy.deepcopy(model)
    if patched:
        memory.fused_gelu(model)
        memory.fused_swiglu(model)
    torch.manual_seed(1)
    targets = ["c_attn", "c_proj", "c_fc"] if fan_in_fan_out else "all-linear"
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                                            fan_in_fan_out=fan_in_fan_out))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if patched:
        memory.shared_lora_input(peft)
    return peft


def _step(peft, ids, autocast: bool):
    """(loss, {trainable name: gradient}, bytes autograd saved for backward, counted once per storage)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(storages.values())


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LLAMA)


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "fp32"])
def test_llama_step_is_bit_for_bit_the_same_with_fewer_saved_activations(autocast):
    base, ids = _llama(), torch.randint(0, LLAMA.vocab_size, TOKENS)
    loss0, grads0, saved0 = _step(_lora(base, False), ids, autocast)
    loss1, grads1, saved1 = _step(_lora(base, True), ids, autocast)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) == 2 * 7 * LLAMA.num_hidden_layers
    assert [n for n in grads0 if not torch.equal(grads0[n], grads1[n])] == []
    # per layer, silu(gate) [tokens, intermediate] no longer saved (it is recomputed), and under autocast two of
    # the three bf16 copies of the attention input (q, k, v) and one of the two of the MLP input (gate, up)
    tokens, h, i = TOKENS[0] * TOKENS[1], LLAMA.hidden_size, LLAMA.intermediate_size
    bf16 = 2 if autocast else 4
    expected = tokens * i * bf16 + (3 * tokens * h * 2 if autocast else 0)
    assert saved0 - saved1 == expected * LLAMA.num_hidden_layers


@pytest.mark.parametrize("reentrant", [False, True])
def test_with_gradient_checkpointing_too(reentrant):
    """Recomputed in backward, the shared copies and the fused MLP save the same tensors again."""
    base, ids = _llama(), torch.randint(0, LLAMA.vocab_size, TOKENS)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    base.enable_input_require_grads()  # what Trainer does for peft models (reentrant checkpoints need it)
    loss0, grads0, _ = _step(_lora(base, False), ids, True)
    loss1, grads1, _ = _step(_lora(base, True), ids, True)
    assert torch.equal(loss0, loss1)
    assert [n for n in grads0 if not torch.equal(grads0[n], grads1[n])] == []


def test_gpt2_step_is_bit_for_bit_the_same_under_autocast():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=300, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    base.config.activation_function = "gelu_pytorch_tanh"  # fused_gelu changes the rounding: compare the rest
    base = GPT2LMHeadModel(base.config)
    ids = torch.randint(0, 300, TOKENS)
    loss0, grads0, _ = _step(_lora(base, False, fan_in_fan_out=True), ids, True)
    loss1, grads1, _ = _step(_lora(base, True, fan_in_fan_out=True), ids, True)
    assert torch.equal(loss0, loss1)
    assert [n for n in grads0 if not torch.equal(grads0[n], grads1[n])] == []


def test_a_readers_input_changed_in_place_gets_a_fresh_copy():
    hook, lin = memory._LastCast(), torch.nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True) * 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (a,) = hook(lin, (x,))
        (b,) = hook(lin, (x,))
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # shared
        with torch.no_grad():
            x.add_(1.0)
        (c,) = hook(lin, (x,))
    assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    assert torch.equal(c, x.detach().to(torch.bfloat16))
    assert hook(lin, (x,)) is None  # outside autocast: nothing to share


def test_only_the_known_swiglu_forward_is_replaced():
    class Other(torch.nn.Module):  # same layers, another computation
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    assert memory.fused_swiglu(Other()) == 0
    assert memory.fused_swiglu(_llama()) == LLAMA.num_hidden_layers


def test_silu_mul_gradients_equal_autograds_of_the_two_operations():
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        g, u = (torch.randn(64, 32, dtype=dtype, requires_grad=True) for _ in range(2))
        grad = torch.randn(64, 32, dtype=dtype)
        plain = torch.autograd.grad(torch.nn.functional.silu(g) * u, (g, u), grad)
        fused = torch.autograd.grad(memory.SiluMul.apply(g, u), (g, u), grad)
        assert all(torch.equal(a, b) for a, b in zip(plain, fused))
