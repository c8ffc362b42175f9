"""Perplexity: the sliding window covers every token once, and medgen matches a plain loop written here."""
import math

import pytest
import torch

from medgen import models
from medgen.evaluate import score, windows


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


def test_matches_plain_loop_and_is_batch_size_invariant():
    tok = models.load_tokenizer("tiny-gpt2")
    model = models.load_model("tiny-gpt2").eval()
    arts = _articles(tok)
    expected = _plain_loop(model, arts, tok.eos_token_id, 32, 16)
    got = {}
    for bs in (1, 3, 8):
        res = score(model, arts, tok.eos_token_id, 32, 16, bs, torch.device("cpu"))
        got[bs] = math.exp(sum(r[0] for r in res) / sum(r[1] for r in res))
        assert [r[1] for r in res] == [len(a["input_ids"]) for a in arts]
    for bs, ppl in got.items():
        assert ppl == pytest.approx(expected, rel=1e-6), (bs, ppl, expected)
