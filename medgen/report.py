"""Stage 5, report: one markdown page (plus PNG plots) from the files the other stages wrote."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from medgen.config import Config
from medgen.data import shards

log = logging.getLogger(__name__)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _loss_plot(log_rows: list[dict], out: Path) -> str | None:
    rows = [r for r in log_rows if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax[0].set(title="training loss", xlabel="step", ylabel="loss")
    ax[1].plot([r["step"] for r in rows], [r.get("learning_rate", 0) for r in rows], color="tab:orange")
    ax[1].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.name


def run(cfg: Config) -> dict[str, Any]:
    run_dir = Path(cfg.run.dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    fs, root = shards.filesystem(cfg.shards_url, cfg.data.storage_options)
    prep = None
    if fs.exists(f"{root}/{shards.REPORT}"):
        with fs.open(f"{root}/{shards.REPORT}") as f:
            prep = json.load(f)
    metrics = _read_json(run_dir / "eval" / "metrics.json")
    train_log = _read_jsonl(run_dir / "train_log.jsonl")
    gens = _read_jsonl(run_dir / "generations" / "generations.jsonl")
    lines = [f"# medgen report: {cfg.run.name}", "",
             f"Model `{cfg.model.name_or_path}` + LoRA r={cfg.lora.r}, {cfg.train.max_steps} steps "
             f"of {cfg.train.batch_size}x{cfg.train.max_length} tokens; config fingerprint `{cfg.fingerprint()}`.", ""]
    if metrics:
        lines += ["## Perplexity", "",
                  f"Split `{metrics['split']}`, {metrics['base']['articles']} articles, {metrics['base']['tokens']} "
                  f"predicted tokens; {metrics['method']} (context {metrics['context']}, stride {metrics['stride']}).", "",
                  "| model | perplexity | 95% CI | bits/byte |", "|---|---|---|---|"]
        for k in ("base", "tuned"):
            if k in metrics:
                m = metrics[k]
                ci = m.get("ci95", [float("nan")] * 2)
                lines.append(f"| {k} | {m['perplexity']:.3f} | {ci[0]:.2f} - {ci[1]:.2f} | {m['bits_per_byte']:.4f} |")
        if "delta" in metrics:
            d = metrics["delta"]
            lines += ["", f"Tuned/base = {d['ratio']:.3f}; paired 95% CI of the difference: "
                          f"{d['ci95'][0]:.2f} to {d['ci95'][1]:.2f}."]
        lines.append("")
    if prep:
        lines += ["## Data", "", f"{prep['rows_read']} rows read, {prep['rows_kept']} kept, {prep['rows_dropped']} dropped.", "",
                  "| dropped because | rows |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in prep["dropped"].items()] or ["| (none) | 0 |"]
        lines += ["", "| split | articles | tokens |", "|---|---|---|"]
        lines += [f"| {k} | {v['articles']} | {v['tokens']} |" for k, v in prep["splits"].items()]
        lines.append("")
    plot = _loss_plot(train_log, out / "training.png")
    if plot:
        lines += ["## Training", "", f"![training curves]({plot})", ""]
    if gens:
        lines += ["## Generations", ""]
        for g in gens[:8]:
            lines += [f"**{g['id']}** _{g['prompt'].strip()}_ {g['completion'].strip()}", ""]
    path = out / "report.md"
    tmp = path.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return {"report": str(path)}
