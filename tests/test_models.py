import json

import pytest
import torch

from medgen import models


def test_offline_gpt2_tokenizer_is_the_real_one():
    tok = models.load_tokenizer("tiny-gpt2")
    assert tok("Hello world, this is Medium.")["input_ids"] == [15496, 995, 11, 428, 318, 13398, 13]
    assert tok.eos_token_id == 50256 and tok.pad_token_id == 50256


def test_tiny_gpt2_uses_the_gpt2_architecture_and_conv1d_lora_defaults():
    model = models.load_model("tiny-gpt2")
    assert model.config.model_type == "gpt2" and model.config.n_positions == 1024
    assert model.config.n_layer == models.BUILTIN_LAYERS["tiny-gpt2"]  # what validate checks lora.top_layers with
    targets, fan_in_fan_out = models.lora_targets(model, [])
    assert targets == ["c_attn", "c_proj", "c_fc"] and fan_in_fan_out is True
    assert models.lora_targets(model, ["c_attn"])[0] == ["c_attn"]


def test_builtin_is_materialised_once_and_fingerprinted():
    a = models.model_fingerprint("tiny-gpt2")
    assert a.startswith("sha256:") and a == models.model_fingerprint("tiny-gpt2")


def test_set_dropout_reaches_every_dropout_and_keeps_the_config():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64))  # pdrop 0.1 everywhere
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         hidden_size=32, intermediate_size=64, vocab_size=64, attention_dropout=0.1))
    for model in (gpt2, llama):
        assert models.set_dropout(model, 0.0) > 0
        model.train()  # dropout would make two passes differ
        ids = torch.randint(0, 64, (2, 16))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, model(ids).logits)
    assert gpt2.config.attn_pdrop == 0.1 and llama.config.attention_dropout == 0.1  # saved config untouched


def test_linear_names_and_top_layers_on_a_llama():
    import pytest
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgen.errors import UserError

    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                                         hidden_size=32, intermediate_size=64, vocab_size=64))
    assert models.linear_names(llama) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                          "v_proj"]  # no lm_head
    assert models.lora_targets(llama, [])[0] == "all-linear"
    assert models.lora_targets(llama, [], listed=True)[0] == models.linear_names(llama)
    assert models.top_layers(llama, 0) is None and models.top_layers(llama, 3) == [1, 2, 3]
    with pytest.raises(UserError, match="lora.top_layers: 5 > the 4 blocks of llama"):
        models.top_layers(llama, 5)


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_smollm2_layer_count_known_to_validate_is_the_gguf_files():
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(models._smollm2_dir(), gguf_file=models.SMOLLM2_GGUF)
    assert c.num_hidden_layers == models.BUILTIN_LAYERS["smollm2-135m"]


def test_an_adapter_saved_again_keeps_its_fingerprint(tmp_path):
    """peft writes target_modules (a set) in the order of the process's string hashing: the fingerprint reads it
    as a set, and still tells other weights or another config apart."""
    from safetensors.torch import save_file

    def saved(name: str, modules: list[str], scale: float = 1.0, r: int = 16):
        d = tmp_path / name
        d.mkdir()
        save_file({"lora_A": torch.ones(2, 2) * scale}, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps({"r": r, "target_modules": modules}, indent=2))
        return models.adapter_fingerprint(d)

    one = saved("a", ["c_attn", "c_proj", "c_fc"])
    assert one == saved("b", ["c_fc", "c_attn", "c_proj"])
    assert len({one, saved("c", ["c_attn", "c_fc"]), saved("d", ["c_attn", "c_proj", "c_fc"], scale=2.0),
                saved("e", ["c_attn", "c_proj", "c_fc"], r=8)}) == 4
