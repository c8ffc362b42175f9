"""Perplexity: the sliding window covers every token once, and medgen matches a plain loop written here."""
import math

import pytest
import torch

from medgen import models
from medgen.config import load_config
from medgen.errors import ConfigError
from medgen.evaluate import accepts_logits_mask, bootstrap_counts, collate, per_tag, plan, score, windows


@pytest.mark.parametrize("n,context,stride", [(1, 8, 4), (7, 8, 4), (8, 8, 7), (30, 8, 3), (100, 16, 15), (9, 8, 1)])
def test_windows_predict_every_token_once_with_history(n, context, stride):
    seen = []
    for begin, end, k in windows(n, context, stride):
        assert end - begin <= context
        targets = list(range(end - k, end))
        for t in targets:
            if begin > 0:
                assert t - begin >= context - stride  # history
        seen += targets
    assert seen == list(range(1, n + 1))


def _plain_loop(model, articles, sep, context, stride):
    """Perplexity-guide style: batch 1, labels masked with -100, token-weighted sums of the model's own loss."""
    nll, count = 0.0, 0
    for a in articles:
        seq = torch.tensor([[sep] + a["input_ids"]])
        length = seq.shape[1]
        prev_end, end = 1, min(context, length)
        while prev_end < length:
            begin = max(0, end - context)
            trg = end - prev_end
            ids = seq[:, begin:end]
            labels = ids.clone()
            labels[:, :-trg] = -100
            with torch.no_grad():
                loss = model(ids, labels=labels).loss
            nll += loss.item() * trg
            count += trg
            prev_end, end = end, min(end + stride, length)
    return math.exp(nll / count)


def _articles(tok):
    texts = ["Short one.", "A somewhat longer article about gardening in small spaces " * 6,
             "Numbers 1 2 3 and more words " * 20, "x"]
    return [{"input_ids": tok(t)["input_ids"]} for t in texts]


def _ppl(res):
    return math.exp(sum(r[0] for r in res) / sum(r[1] for r in res))


def test_matches_plain_loop_and_is_batch_size_invariant():
    tok = models.load_tokenizer("tiny-gpt2")
    model = models.load_model("tiny-gpt2").eval()
    arts = _articles(tok)
    expected = _plain_loop(model, arts, tok.eos_token_id, 32, 16)
    got = {}
    for bs in (1, 3, 8):
        res = score(model, arts, tok.eos_token_id, 32, 16, bs, torch.device("cpu"))
        got[bs] = _ppl(res)
        assert [r[1] for r in res] == [len(a["input_ids"]) for a in arts]
    for bs, ppl in got.items():
        assert ppl == pytest.approx(expected, rel=1e-6), (bs, ppl, expected)


def _tiny_llama():
    """A random 2-layer Llama (the SmolLM2 architecture: RoPE, RMSNorm, tied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _with_random_lora(model):
    """A PEFT model whose LoRA actually changes the output (B is random, not the usual zeros)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    targets, fan_in_fan_out = models.lora_targets(model, [])
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_model_adapter_on_and_off_matches_plain_loop(arch):
    """Target-only logits through a PEFT wrapper, for GPT-2 (Conv1D) and Llama/SmolLM2 blocks."""
    model = models.load_model("tiny-gpt2") if arch == "gpt2" else _tiny_llama()
    assert accepts_logits_mask(model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    arts = [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in (5, 40, 97, 64)]
    peft = _with_random_lora(model)
    assert accepts_logits_mask(peft)
    cpu = torch.device("cpu")
    with peft.disable_adapter():
        base_ref = _plain_loop(peft, arts, 0, 32, 12)
        base = _ppl(score(peft, arts, 0, 32, 12, 3, cpu))
    tuned_ref = _plain_loop(peft, arts, 0, 32, 12)
    tuned = _ppl(score(peft, arts, 0, 32, 12, 5, cpu))
    assert base == pytest.approx(base_ref, rel=1e-6) and tuned == pytest.approx(tuned_ref, rel=1e-6)
    assert abs(tuned - base) / base > 1e-3  # the adapter really was on for one and off for the other


def test_collate_keeps_only_target_positions():
    work = plan([{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [11]}], sep=0, context=4, stride=2)
    # article 0: [0 5 6 7] targets 5 6 7; [6 7 8 9] targets 8 9; article 1: [0 11] target 11
    got = [(w.article, w.ids, w.targets) for w in work]
    assert got == [(0, [0, 5, 6, 7], 3), (0, [6, 7, 8, 9], 2), (1, [0, 11], 1)]
    ids, keep, targets = collate(work, torch.device("cpu"))
    assert targets.tolist() == [5, 6, 7, 8, 9, 11]
    assert keep.tolist() == [[True, True, True, False], [False, True, True, False], [True, False, False, False]]
    assert ids[2].tolist()[:2] == [0, 11]


def test_bootstrap_is_seeded_and_paired():
    a, b = bootstrap_counts(7, 50, seed=3), bootstrap_counts(7, 50, seed=3)
    assert a.shape == (50, 7) and (a == b).all() and (a.sum(1) == 7).all()
    assert not (bootstrap_counts(7, 50, seed=4) == a).all()


def test_per_tag_sums_articles_of_each_tag():
    rows = [{"tags": ["a", "b"], "tokens": 10, "base_nll": 20.0}, {"tags": ["a"], "tokens": 30, "base_nll": 30.0},
            {"tags": [], "tokens": 5, "base_nll": 1.0}]
    out = per_tag(rows, "base", top=1)
    assert list(out) == ["a"] and out["a"]["tokens"] == 40 and out["a"]["articles"] == 2
    assert out["a"]["perplexity"] == pytest.approx(math.exp(50.0 / 40))
    assert per_tag(rows, "base", top=0) == {}


@pytest.mark.parametrize("override,message", [
    ("eval.bootstrap=1", "eval.bootstrap: must be >= 2"),
    ("eval.threads=-1", "eval.threads: must be >= 0"),
    ("eval.max_articles=-2", "eval.max_articles: must be >= 0"),
    ("eval.stride=512", "eval.stride: must be < eval.context"),
])
def test_eval_config_mistakes_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override])
    assert any(p.startswith(message) for p in e.value.problems), e.value.problems

