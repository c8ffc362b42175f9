"""`medgen run` on the bundled demo data with tiny-gpt2: every output of the contract, checked for content."""
import json
import math
import re

import pytest
import torch

from medgen import models
from medgen.generate import read_prompts
from medgen.config import DEMO_PROMPTS


def test_manifest_lists_complete_shards(tiny_run):
    manifest = json.loads((tiny_run / "data" / "manifest.json").read_text())
    report = json.loads((tiny_run / "data" / "prepare_report.json").read_text())
    assert report["rows_kept"] + report["rows_dropped"] == report["rows_read"] == 52
    assert report["dropped"] == {"duplicate_exact": 2, "missing_text": 1}
    for split, info in manifest["splits"].items():
        assert len(info["shards"]) == 2
        for entry in info["shards"]:
            assert (tiny_run / "data" / entry["path"]).stat().st_size == entry["bytes"]
    assert sum(s["articles"] for s in manifest["splits"].values()) == report["rows_kept"]
    assert not list((tiny_run / "data").glob("_tmp-*"))


def test_adapter_reloads_and_was_trained(tiny_run):
    from peft import PeftModel

    adapter = tiny_run / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    base = models.load_model("tiny-gpt2")
    model = PeftModel.from_pretrained(base, str(adapter))
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b, "no LoRA weights in the adapter"
    # LoRA initialises B to zero: a trained adapter has moved it
    assert max(p.abs().max().item() for p in lora_b.values()) > 1e-4
    ids = torch.tensor([[464, 3290, 318, 257]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert (tuned - plain).abs().max().item() > 1e-6


def test_metrics_are_exact_sums(tiny_run):
    metrics = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    for k in ("base", "tuned"):
        m = metrics[k]
        assert m["perplexity"] == pytest.approx(math.exp(m["nll_sum"] / m["tokens"]), rel=1e-12)
        assert m["tokens"] > 0 and m["ci95"][0] <= m["perplexity"] <= m["ci95"][1]
        assert m["bits_per_byte"] == pytest.approx(m["nll_sum"] / math.log(2) / m["bytes"])
    assert metrics["base"]["tokens"] == metrics["tuned"]["tokens"]
    rows = [json.loads(x) for x in (tiny_run / "eval" / "articles.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["base"]["articles"]
    assert sum(r["tokens"] for r in rows) == metrics["base"]["tokens"]


def test_one_generation_per_prompt(tiny_run):
    prompts = read_prompts(DEMO_PROMPTS)
    lines = (tiny_run / "generations" / "generations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [p["id"] for p in prompts]
    for r, p in zip(records, prompts):
        assert r["prompt"] == p["prompt"] and isinstance(r["completion"], str)
        assert r["finish_reason"] in ("eos", "length") and r["completion_tokens"] <= 12


def test_report_exists(tiny_run):
    text = (tiny_run / "report" / "report.md").read_text()
    assert "## Perplexity" in text and "## Data" in text and "## Generations" in text
    assert (tiny_run / "report" / "training.png").stat().st_size > 1000
    # speed from train_log.jsonl: tokens/s, MFU (unknown for a CPU), every rank's peak memory
    assert re.search(r"\| tokens/s \(median over logged steps\) \| [\d,]+ \|", text), text
    assert "| MFU (median) | n/a (device peak not known) |" in text and re.search(r"\| peak memory, rank 0 \| [\d.]+ GB \|", text)


def test_tensorboard_has_the_throughput(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/tokens_per_s", "train/peak_memory_gb"} <= set(events.Tags()["scalars"])
