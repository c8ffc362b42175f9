"""The report describes the run it reports: each stage's record of the config it ran with, not the config of the
command that renders it; it runs no model (the base model's completions come from the generate stage)."""
import json
import shutil

from medgen import report
from tests.helpers import TINY, medgen


def _rows(md: str) -> dict[str, str]:
    return {ln.split(" | ")[0].strip("| "): ln.split(" | ", 1)[1].rstrip(" |") for ln in md.splitlines()
            if ln.startswith("| ") and " | " in ln}


def test_the_run_table_shows_the_settings_training_used(tmp_path, tiny_run):
    run, data = tmp_path / "run", tiny_run / "data"
    medgen("train", *TINY, f"run.dir={run}", f"data.shards={data}", "train.max_steps=3", "train.batch_size=3",
           "train.max_length=32", "lora.r=4", "train.learning_rate=0.002", "train.save_steps=3")
    record = json.loads((run / "adapter" / "medgen_config.json").read_text())
    assert record["stage"] == "train" and record["config"]["train"]["max_steps"] == 3
    assert record["resolved"]["precision"] == "fp32" and record["resolved"]["world_size"] == 1
    # the report command's own config says 6 steps x 2 x 64 tokens, r=16, lr 0.001, and run.dir/data as the data
    medgen("report", *TINY, f"run.dir={run}")
    md = (run / "report" / "report.md").read_text()
    rows = _rows(md)
    assert rows["training"].startswith("3 steps x 3 x 32 tokens (grad accum 1) x 1 process(es), lr 0.002 cosine, "
                                       "precision fp32"), rows["training"]
    assert rows["LoRA"].startswith("r=4, "), rows["LoRA"]
    assert f"-> `{data}`" in rows["data"] and "## Data" in md  # the prepare report of the data training read
    assert rows["config fingerprint (train)"] == f"`{record['fingerprint']}`"
    assert "**Note:**" not in md
    assert json.loads((run / "report" / "medgen_config.json").read_text())["stage"] == "report"

    # evaluate this adapter, then train again from scratch with another seed: the evaluation no longer describes
    # the adapter in adapter/
    medgen("evaluate", *TINY, f"run.dir={run}", f"data.shards={data}", "eval.max_articles=2")
    shutil.rmtree(run / "checkpoints")
    medgen("train", *TINY, f"run.dir={run}", f"data.shards={data}", "train.max_steps=3", "train.batch_size=3",
           "train.max_length=32", "lora.r=4", "train.learning_rate=0.002", "train.seed=7")
    medgen("report", *TINY, f"run.dir={run}")
    md = (run / "report" / "report.md").read_text()
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())["adapter_fingerprint"]
    trained = json.loads((run / "adapter" / "medgen_config.json").read_text())["resolved"]["adapter_fingerprint"]
    assert evaluated != trained
    assert f"**Note:** evaluate used adapter {evaluated}, but training left {trained}: rerun evaluate." in md


def test_the_report_runs_no_model_and_compares_base_and_tuned_on_the_same_prompts(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    base = [json.loads(x) for x in (run / "generations" / "base.jsonl").read_text().splitlines()]
    tuned = [json.loads(x) for x in (run / "generations" / "generations.jsonl").read_text().splitlines()]
    assert [(b["id"], b["prompt"]) for b in base] == [(t["id"], t["prompt"]) for t in tuned][:len(base)]
    assert all(b["adapter_fingerprint"] == "" for b in base) and tuned[0]["adapter_fingerprint"]
    # no model at that path: the report must not need one
    medgen("report", *TINY, f"run.dir={run}", "model.name_or_path=/nonexistent/model", f"data.shards={tiny_run}/data")
    md = (run / "report" / "report.md").read_text()
    first = md.split("## Generations", 1)[1]
    shown = report.cell(base[0]["completion"])
    assert "| base | tuned |" in first and f"| {shown} |" in first
    n = len(base)
    assert f"| base model ({n} prompts) |" in md and f"| tuned, same prompts ({n}) |" in md
    # the judge's scores, written by generate on the first generate.judge_prompts prompts, base vs tuned paired
    assert all(isinstance(r["relevance"], float) and r["fluency_perplexity"] > 0 for r in base + tuned[:n])
    judged = md.split("## Fluency and relevance (judge model)", 1)[1].split("##", 1)[0]
    assert f"Judge `tiny-gpt2`, {n} prompts completed by both models" in judged
    rows = [ln for ln in judged.splitlines() if ln.startswith("| fluency") or ln.startswith("| relevance")]
    assert len(rows) == 2 and all(" to " in ln for ln in rows), judged


def test_generated_text_renders_as_text_in_markdown_and_html():
    text = "Use ```python\nx = a*b_c | d``` and **bold** <b> [link](x) # not a heading"
    md = report.md_table(["completion"], [[report.cell(text)]])
    page = report.to_html("\n".join(md), None)
    assert "<code>" not in page and "<b>bold" not in page and "<b>" not in page.split("<body>")[1]
    assert "Use ```python x = a*b_c | d``` and **bold** &lt;b&gt; [link](x) # not a heading" in page
