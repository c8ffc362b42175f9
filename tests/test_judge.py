"""Generation scores (medgen/judge.py): relevance tells an on-topic continuation from an off-topic one, and both
scores are what a direct computation with the judge model gives."""
import math

import pytest
import torch

from medgen.judge import Judge, paired

PROMPT = "To bake a loaf of sourdough bread at home, first mix the flour with water and your starter,"
ON_TOPIC = " then let the dough rest for an hour before you fold it and shape it into a round loaf."
OFF_TOPIC = " while the central bank raised interest rates and stock markets in Asia closed lower on Tuesday."


def direct(model, tok, prompt: str, completion: str) -> tuple[float, float]:
    """(fluency perplexity, relevance) from the model's log-softmax (float32, as the judge scores), token by token,
    summed in float64, one sequence at a time."""
    c = tok(completion, add_special_tokens=False)["input_ids"]

    def mean_logp(context: list[int]) -> float:
        ids = torch.tensor([context + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1).double()  # fp32, as scored
        return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(c)) / len(c)

    given_prompt = mean_logp(tok(prompt, add_special_tokens=False)["input_ids"])
    return math.exp(-given_prompt), given_prompt - mean_logp([tok.eos_token_id])


@pytest.mark.slow  # the real SmolLM2-135M
def test_relevance_ranks_on_and_off_topic_and_both_scores_are_the_direct_computation():
    judge = Judge.load("smollm2-135m", "", torch.device("cpu"))
    on, off, empty = judge.score([(PROMPT, ON_TOPIC), (PROMPT, OFF_TOPIC), (PROMPT, "")])
    assert on["relevance"] > off["relevance"] and on["relevance"] > 0, (on, off)
    assert empty is None
    for text, got in ((ON_TOPIC, on), (OFF_TOPIC, off)):
        fluency, relevance = direct(judge.model, judge.tok, PROMPT, text)
        assert got["fluency_perplexity"] == pytest.approx(fluency, rel=1e-6)
        assert got["relevance"] == pytest.approx(relevance, rel=1e-6, abs=1e-6)


def test_paired_summary_matches_plain_means_and_pairs_by_id():
    base = [{"id": f"p{i}", "fluency_perplexity": 10.0 + i, "relevance": 0.1 * i} for i in range(5)]
    tuned = [{"id": f"p{i}", "fluency_perplexity": 8.0 + i, "relevance": 0.1 * i + 0.05} for i in range(4)]
    tuned.append({"id": "only-tuned", "fluency_perplexity": 1.0, "relevance": 9.0})  # no base: not compared
    s = paired(base, tuned, resamples=200, seed=0)
    assert s["prompts"] == 4
    assert s["relevance"]["difference"] == pytest.approx(0.05) and s["relevance"]["ci95"] == pytest.approx([0.05, 0.05])
    logs = [math.log(8.0 + i) - math.log(10.0 + i) for i in range(4)]
    assert s["log_fluency_perplexity"]["difference"] == pytest.approx(sum(logs) / 4)
    lo, hi = s["log_fluency_perplexity"]["ci95"]
    assert min(logs) <= lo <= hi <= max(logs)
