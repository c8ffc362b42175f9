from medgen import models


def test_offline_gpt2_tokenizer_is_the_real_one():
    tok = models.load_tokenizer("tiny-gpt2")
    assert tok("Hello world, this is Medium.")["input_ids"] == [15496, 995, 11, 428, 318, 13398, 13]
    assert tok.eos_token_id == 50256 and tok.pad_token_id == 50256


def test_tiny_gpt2_uses_the_gpt2_architecture_and_conv1d_lora_defaults():
    model = models.load_model("tiny-gpt2")
    assert model.config.model_type == "gpt2" and model.config.n_positions == 1024
    targets, fan_in_fan_out = models.lora_targets(model, [])
    assert targets == ["c_attn", "c_proj", "c_fc"] and fan_in_fan_out is True
    assert models.lora_targets(model, ["c_attn"])[0] == ["c_attn"]


def test_builtin_is_materialised_once_and_fingerprinted():
    a = models.model_fingerprint("tiny-gpt2")
    assert a.startswith("sha256:") and a == models.model_fingerprint("tiny-gpt2")
