"""`medgen evaluate` through the CLI: a plain loop written here, 1/2/3 processes, batch sizes, idle ranks.

Each variant evaluates its own copy of the session's tiny run (random GPT-2 + a trained adapter).
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import ROOT, medgen

TORCHRUN = Path(sys.executable).with_name("torchrun")
REL = 1e-6
# what may differ between runs of the same evaluation
VOLATILE = {"world_size", "timing"}


def _evaluate(tiny_run: Path, dest: Path, name: str, procs: int, *overrides: str) -> Path:
    run = dest / name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "checkpoints", "tensorboard"))
    args = ["evaluate", "-q", "--config", "configs/tiny.yaml", f"run.dir={run}", *overrides]
    if procs == 1:
        medgen(*args)
    else:
        proc = subprocess.run(
            [str(TORCHRUN), "--nproc_per_node", str(procs), "--standalone", "-m", "medgen", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "ACCELERATE_USE_CPU": "true"},
        )
        assert proc.returncode == 0, proc.stderr[-5000:]
    return run / "eval"


@pytest.fixture(scope="module")
def evals(tiny_run, tmp_path_factory):
    dest = tmp_path_factory.mktemp("evals")
    return {
        "1": _evaluate(tiny_run, dest, "1", 1),
        "1-bs1": _evaluate(tiny_run, dest, "1-bs1", 1, "eval.batch_size=1"),
        "2": _evaluate(tiny_run, dest, "2", 2),
        "3": _evaluate(tiny_run, dest, "3", 3, "eval.batch_size=3"),
        # 3 ranks, 2 articles: one rank scores nothing and must still join every collective
        "3-idle": _evaluate(tiny_run, dest, "3-idle", 3, "eval.max_articles=2"),
        "unmerged": _evaluate(tiny_run, dest, "unmerged", 1, "eval.merge_tolerance=0"),
    }


def _load(d: Path):
    metrics = json.loads((d / "metrics.json").read_text())
    rows = [json.loads(x) for x in (d / "articles.jsonl").read_text().splitlines()]
    return metrics, rows


def _assert_close(a, b, path="", rel=REL):
    """Equal structure; floats within ``rel``; everything else identical."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in VOLATILE:
                _assert_close(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel), path
    else:
        assert a == b, path


def _reference(run: Path, adapter: bool) -> list[tuple[float, int]]:
    """Per-article (NLL, tokens) of the test split with a plain batch-1 loop, reading the shards directly."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from medgen import models

    manifest = json.loads((run / "data" / "manifest.json").read_text())
    ids = [r for s in manifest["splits"]["test"]["shards"]
           for r in pq.read_table(run / "data" / s["path"], columns=["input_ids"]).column("input_ids").to_pylist()]
    model = GPT2LMHeadModel.from_pretrained(models.resolve("tiny-gpt2")).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, str(run / "adapter")).eval()
    sep, context, stride = manifest["tokenizer"]["eos_token_id"], 128, 64  # configs/tiny.yaml
    out = []
    for toks in ids:
        seq = torch.tensor([[sep] + toks])
        nll, count, prev_end, end = 0.0, 0, 1, min(context, seq.shape[1])
        while prev_end < seq.shape[1]:
            window = seq[:, max(0, end - context):end]
            labels = window.clone()
            labels[:, :-(end - prev_end)] = -100
            with torch.no_grad():
                nll += model(window, labels=labels).loss.item() * (end - prev_end)
            count += end - prev_end
            prev_end, end = end, min(end + stride, seq.shape[1])
        out.append((nll, count))
    return out


def test_cli_matches_a_plain_loop(evals, tiny_run):
    metrics, rows = _load(evals["1"])
    for key, adapter in (("base", False), ("tuned", True)):
        ref = _reference(tiny_run, adapter)
        nll, tokens = sum(r[0] for r in ref), sum(r[1] for r in ref)
        m = metrics[key]
        assert m["tokens"] == tokens and m["articles"] == len(ref)
        assert m["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=REL)
        assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(r["bytes"] for r in rows), rel=REL)
        assert [r["tokens"] for r in rows] == [r[1] for r in ref]
        assert [r[f"{key}_nll"] for r in rows] == pytest.approx([r[0] for r in ref], rel=REL)


@pytest.mark.parametrize("variant", ["1-bs1", "2", "3"])
def test_same_result_for_any_world_and_batch_size(evals, variant):
    m1, rows1 = _load(evals["1"])
    m, rows = _load(evals[variant])
    _assert_close(m1, m)
    _assert_close(rows1, rows)  # same articles, same order, same per-article sums
    assert m["world_size"] == int(variant[0])


def test_more_ranks_than_articles(evals):
    m1, rows1 = _load(evals["1"])
    m, rows = _load(evals["3-idle"])
    assert m["world_size"] == 3 and m["base"]["articles"] == len(rows) == 2
    _assert_close(rows1[:2], rows)
    assert m["base"]["tokens"] == sum(r["tokens"] for r in rows)


def test_metrics_schema(evals):
    m, _ = _load(evals["1"])
    for key in ("base", "tuned"):
        block = m[key]
        for field in ("perplexity", "nll_sum", "tokens", "articles", "bytes", "bits_per_byte", "ci95", "per_tag",
                      "method", "context", "stride", "model", "model_fingerprint", "adapter_fingerprint"):
            assert field in block, (key, field)
        assert block["method"] == "sliding_window" and (block["context"], block["stride"]) == (128, 64)
        assert block["ci95"][0] <= block["perplexity"] <= block["ci95"][1]
    assert m["base"]["adapter_fingerprint"] == "" and m["tuned"]["adapter_fingerprint"].startswith("sha256:")
    assert m["bootstrap"] == {"resamples": 1000, "seed": 0, "unit": "article"}
    d = m["delta"]
    assert d["ci95"][0] <= d["perplexity"] <= d["ci95"][1]
    assert d["ratio"] == pytest.approx(m["tuned"]["perplexity"] / m["base"]["perplexity"])


def test_tuned_model_scored_merged_gives_the_unmerged_numbers(evals):
    """The tuned pass runs with the adapter merged into the weights (as fast as the base pass) when the merged
    logits match; the numbers are the unmerged model's within the merge's rounding, and metrics say which ran."""
    merged, rows_merged = _load(evals["1"])
    unmerged, rows_unmerged = _load(evals["unmerged"])
    assert merged["tuned"]["adapter_merged"] is True and 0 <= merged["tuned"]["merge_difference"] <= 1e-4
    assert unmerged["tuned"]["adapter_merged"] is False and unmerged["tuned"]["merge_difference"] is None
    for key in ("adapter_merged", "merge_difference"):
        del merged["tuned"][key], unmerged["tuned"][key]
    # merged weights round differently: perplexities agree to ~1e-8, differences of them (delta: tuned - base,
    # ~580 at a perplexity of ~50,000 for this random model) to ~1e-6; 1e-5 bounds both with room
    _assert_close(merged, unmerged, rel=1e-5)
    _assert_close(rows_merged, rows_unmerged, rel=1e-5)
    assert merged["tuned"]["perplexity"] != merged["base"]["perplexity"]


def test_progress_shows_in_a_log_that_is_not_a_terminal(tmp_path, tiny_run):
    """A job log is not a terminal (no bar there): evaluate logs its progress as lines (tests/test_progress.py)."""
    import re

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "adapter", run / "adapter")
    err = medgen("evaluate", "--config", "configs/tiny.yaml", f"run.dir={run}", f"data.shards={tiny_run / 'data'}").stderr
    for model in ("base", "tuned"):
        n = re.search(rf"eval {model}: 0/(\d+) windows", err)
        assert n, err[-3000:]
        assert re.search(rf"eval {model}: {n.group(1)}/{n.group(1)} windows, (\d+)/\1 articles, \d+ tokens, \d+ tokens/s, "
                         r"done in", err)
