"""Is a completion fluent, and is it about its prompt? Two scores from a judge model (the base model by default,
``generate.judge``), computed by the generate stage, which has the models loaded (the report only reads).

For a completion c of a prompt p, both tokenized on their own with the judge's tokenizer:

- ``fluency_perplexity`` = exp(mean NLL of c's tokens given p): how likely the judge finds the text where it
  stands. Lower = more fluent. It rewards safe, repetitive text too: read it beside distinct-n and repetition.
- ``relevance`` = mean log-likelihood of c's tokens given p minus given only the end-of-text token (nats per
  token): how much knowing the prompt helps predict the completion. Above 0: the prompt explains it; about 0:
  the completion would be as likely after any prompt. It does not say the completion is right or good.

Both are float64 sums over the same windows evaluate scores (evaluate.window_nll), so a score does not depend on
the batch it was computed in. ``paired`` summarises them as base vs tuned on the same prompts with bootstrap
intervals, for the report and a sweep's comparison.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from medgen import evaluate, models

FIELDS = ("fluency_perplexity", "relevance")


class Judge:
    """A loaded causal LM and its tokenizer, scoring completions."""

    def __init__(self, name: str, model, tok, device: torch.device, batch_size: int = 16):
        self.name, self.model, self.tok, self.device, self.batch_size = name, model, tok, device, batch_size

    @classmethod
    def load(cls, name_or_path: str, revision: str, device: torch.device) -> "Judge":
        tok = models.load_tokenizer(name_or_path, revision)
        model = models.load_model(name_or_path, revision, torch.float32).to(device).eval()
        return cls(name_or_path, model, tok, device)

    def score(self, pairs: list[tuple[str, str]]) -> list[dict[str, float] | None]:
        """fluency_perplexity and relevance of each (prompt, completion); None for an empty completion."""
        eos = self.tok.eos_token_id
        work, index = [], []
        for i, (prompt, completion) in enumerate(pairs):
            p = self.tok(prompt, add_special_tokens=False)["input_ids"] or [eos]
            c = self.tok(completion, add_special_tokens=False)["input_ids"]
            if not c:
                continue
            work += [evaluate.Window(i, p + c, len(c)), evaluate.Window(i, [eos] + c, len(c))]
            index.append((i, len(c)))
        nll = evaluate.window_nll(self.model, work, self.batch_size, self.device)  # in generate's progress
        out: list[dict[str, float] | None] = [None] * len(pairs)
        for k, (i, n) in enumerate(index):
            given_prompt, given_nothing = nll[2 * k] / n, nll[2 * k + 1] / n
            out[i] = {"fluency_perplexity": math.exp(given_prompt), "relevance": given_nothing - given_prompt}
        return out


def paired(base: list[dict], tuned: list[dict], resamples: int, seed: int) -> dict[str, Any]:
    """Base vs tuned on the prompts both scored (matched by id and sample): per score the two means, the mean
    of tuned - base and its 95% bootstrap interval (resampling prompts; fluency as log-perplexity, whose mean
    is the geometric mean's log)."""
    key = lambda r: (r["id"], r.get("sample", 0))  # noqa: E731
    b = {key(r): r for r in base if r.get("relevance") is not None}
    pairs = [(b[key(t)], t) for t in tuned if t.get("relevance") is not None and key(t) in b]
    if len(pairs) < 2:
        return {}
    counts = evaluate.bootstrap_counts(len(pairs), resamples, seed) / len(pairs)
    out: dict[str, Any] = {"prompts": len(pairs), "bootstrap": {"resamples": resamples, "seed": seed}}
    for name, f in (("log_fluency_perplexity", lambda r: math.log(r["fluency_perplexity"])),
                    ("relevance", lambda r: r["relevance"])):
        x = np.array([[f(bb), f(tt)] for bb, tt in pairs], dtype=np.float64)
        diff = x[:, 1] - x[:, 0]
        out[name] = {"base": float(x[:, 0].mean()), "tuned": float(x[:, 1].mean()), "difference": float(diff.mean()),
                     "ci95": evaluate.interval(counts @ diff)}
    return out
