"""Stage 5, report: ``report/report.md`` and a self-contained ``report.html``, with PNG plots.

Reads only what the other stages wrote, and runs no model: the prepare report, each stage's record of the
config it ran with (medgen/provenance.py), train_log.jsonl, eval/metrics.json and eval/articles.jsonl,
generations.jsonl and the base model's completions (generations/base.jsonl), and the held-out split (for
text statistics). The run is described from those records, not from the config of the report command.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import math
import statistics
import re
from pathlib import Path
from typing import Any

from medgen import atomic, judge, provenance
from medgen.config import Config
from medgen.data import shards
from medgen.data.retry import retrying
from medgen.data.storage import disk_errors
from medgen.models import versions

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _prepare_report(cfg: Config) -> dict | None:
    fs, root = shards.filesystem(cfg.shards_url, cfg.data.storage_options)
    path = f"{root}/{shards.REPORT}"
    try:
        text = retrying(lambda: fs.cat_file(path), "data.shards", cfg.shards_url, cfg.data.retry_seconds)
    except FileNotFoundError:
        return None
    return json.loads(text)


def _held_out_texts(cfg: Config, limit: int = 200) -> list[str]:
    from medgen.data.stream import load_articles

    try:
        manifest = shards.read_manifest(cfg.shards_url, cfg.data.storage_options, cfg.data.retry_seconds)
        rows = load_articles(cfg.shards_url, manifest, cfg.data.storage_options, cfg.eval.split, ("text",),
                             cfg.data.retry_seconds)
    except Exception as e:  # the report still renders without this section
        log.warning("report: no held-out texts (%s)", e)
        return []
    return [r["text"] for r in rows[:limit]]


# --------------------------------------------------------------------------- text statistics


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def text_stats(texts: list[str]) -> dict[str, float]:
    """Means over texts of distinct-n (unique n-grams / n-grams), repetition (share of 4-grams already
    seen in the same text) and length in words."""
    toks = [w for w in (_words(t) for t in texts) if len(w) >= 4]
    if not toks:
        return {}
    out: dict[str, float] = {}
    for n in (1, 2, 3):
        out[f"distinct_{n}"] = sum(len(set(_grams(w, n))) / len(_grams(w, n)) for w in toks) / len(toks)
    out["repetition_4gram"] = sum(1 - len(set(_grams(w, 4))) / len(_grams(w, 4)) for w in toks) / len(toks)
    out["mean_words"] = sum(len(re.findall(r"\w+", t)) for t in texts) / len(texts)
    return out


def _grams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def _snippets(texts: list[str], words: int) -> list[str]:
    """Held-out articles cut to about the length of a completion, so the statistics compare like with like."""
    out = []
    for t in texts:
        ws = t.split()
        if len(ws) > words:
            mid = len(ws) // 2
            out.append(" ".join(ws[mid:mid + words]))
    return out


# --------------------------------------------------------------------------- plots


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def plot_training(rows: list[dict], out: Path) -> str | None:
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    plt = pyplot()
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    ax[0].plot(steps, [r["loss"] for r in rows], marker=".", color="tab:blue", label="train")
    if val:
        ax[0].plot(*zip(*val), marker="o", color="tab:red", label="validation")
        ax[0].legend(loc="best", fontsize=8)
    ax[0].set(title="loss: train vs validation" if val else "training loss", xlabel="step", ylabel="loss (nats/token)")
    ax[1].plot(steps, [r.get("learning_rate", float("nan")) for r in rows], color="tab:orange")
    ax[1].set(title="learning rate", xlabel="step")
    tps = [(r["step"], r["tokens_per_s"]) for r in rows if "tokens_per_s" in r]
    if tps:
        ax[2].plot(*zip(*tps), marker=".", color="tab:green")
    ax[2].set(title="throughput", xlabel="step", ylabel="tokens/s")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.name


def plot_per_tag(metrics: dict, out: Path) -> str | None:
    base = metrics.get("base", {}).get("per_tag") or {}
    if not base:
        return None
    plt = pyplot()
    tuned = metrics.get("tuned", {}).get("per_tag") or {}
    tags = list(base)[:10]
    x = range(len(tags))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tags) + 2), 3.6))
    w = 0.4 if tuned else 0.8
    ax.bar([i - w / 2 if tuned else i for i in x], [base[t]["perplexity"] for t in tags], w, label="base")
    if tuned:
        ax.bar([i + w / 2 for i in x], [tuned[t]["perplexity"] for t in tags], w, label="tuned")
    ax.set_xticks(list(x))
    ax.set_xticklabels([f"{t}\n({base[t]['articles']})" for t in tags], rotation=30, ha="right", fontsize=8)
    ax.set(title="perplexity by tag (articles per tag)", ylabel="perplexity")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside the axes: never over a bar
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.name


def plot_article_nll(rows: list[dict], out: Path) -> str | None:
    if not rows:
        return None
    plt = pyplot()
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    series = {k: [r[f"{k}_nll"] / r["tokens"] for r in rows if f"{k}_nll" in r and r["tokens"]] for k in ("base", "tuned")}
    everything = [v for vals in series.values() for v in vals]
    bins = np.linspace(min(everything), max(everything), min(30, max(6, len(everything) // 3)) + 1)
    for (key, vals), color in zip(series.items(), ("tab:blue", "tab:orange")):
        if vals:
            ax.hist(vals, bins=bins, alpha=0.55, color=color, label=f"{key} (median {np.median(vals):.2f})")
    ax.set(title="per-article NLL", xlabel="mean NLL per token (nats)", ylabel="articles")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.name


# --------------------------------------------------------------------------- markdown


def _fmt(x: float, d: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def _section_speed(rows: list[dict]) -> list[str]:
    """Median tokens/s and MFU over the logged steps, and each rank's peak memory at the end."""
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    mfu = [r["mfu"] for r in rows if "mfu" in r]
    memory = next((r["peak_memory_gb_per_rank"] for r in reversed(rows) if "peak_memory_gb_per_rank" in r), [])
    if not (tps or memory):
        return []
    table = [["tokens/s (median over logged steps)", f"{statistics.median(tps):,.0f}" if tps else "n/a"],
             ["MFU (median)", f"{100 * statistics.median(mfu):.1f}%" if mfu else "n/a (device peak not known)"]]
    table += [[f"peak memory, rank {i}", f"{gb:.2f} GB"] for i, gb in enumerate(memory)]
    seen = next((r for r in reversed(rows) if "tokens_seen" in r), None)
    if seen:
        table.append(["data seen", f"{seen['tokens_seen']:,} tokens = {seen['train_fraction']:.3f} of the training "
                                   "split (1.0 = one pass)"])
    return md_table(["speed", "value"], table)


def _section_config(records: dict[str, dict | None], prep: dict | None, data_url: str) -> list[str]:
    """The settings the stages ran with, from their records; where two stages disagree, said so."""
    train, ev = records.get("train"), records.get("evaluate")
    rows = []
    ran = train or ev or records.get("generate")
    if ran:
        rows.append(["model", f"`{ran['config']['model']['name_or_path']}`"])
    if train:
        t, lo, r = train["config"]["train"], train["config"]["lora"], train["resolved"]
        targets = lo["target_modules"] or r.get("lora_targets") or "architecture default"
        rows += [["LoRA", f"r={lo['r']}, alpha={lo['alpha']}, dropout={lo['dropout']}, targets={targets}"],
                 ["training", f"{t['max_steps']} steps x {t['batch_size']} x {t['max_length']} tokens (grad accum "
                              f"{t['grad_accum']}) x {r.get('world_size', 1)} process(es), lr {t['learning_rate']} "
                              f"{t['lr_scheduler']}, precision {r.get('precision', t['precision'])}, packing {t['packing']}"]]
        if r.get("adapter_step") is not None:
            v = r.get("validation") or {}
            score = (f", validation perplexity {v['perplexity']:.3f} on {v['articles']} articles" if v else "")
            rows.append(["adapter", f"step {r['adapter_step']} of {r.get('steps')} ({r.get('adapter_choice')}{score}); "
                                    f"stopped: {r.get('stopped')}"])
    else:
        rows.append(["training", "no record (adapter/medgen_config.json): not trained, or trained before runs "
                                 "recorded their settings"])
    source = (prep or {}).get("source", "not recorded")
    rows.append(["data", f"`{source}` -> `{data_url}`"])
    if ev:
        e, r = ev["config"]["eval"], ev["resolved"]
        rows.append(["evaluation", f"split `{e['split']}`, context {r.get('context', e['context'])}, stride "
                                   f"{r.get('stride', e['stride'])}, {r.get('world_size', 1)} process(es)"])
    prints: dict[str, list[str]] = {}
    for k, v in records.items():
        if v:
            prints.setdefault(v["fingerprint"], []).append(k)
    rows += [[f"config fingerprint ({', '.join(stages)})", f"`{fp}`"] for fp, stages in prints.items()]
    out = ["## Run", ""] + md_table(["setting", "value"], rows)
    for problem in provenance.disagreements(records):
        out += [f"**Note:** {problem}.", ""]
    return out


def _section_perplexity(metrics: dict) -> list[str]:
    out = ["## Perplexity", "",
           f"Split `{metrics['split']}`: {metrics['base']['articles']} articles, {metrics['base']['tokens']} predicted "
           f"tokens, {metrics['method']} (context {metrics['context']}, stride {metrics['stride']}); perplexity = "
           "exp(sum of token NLL / number of predicted tokens); 95% intervals bootstrap over articles.", ""]
    rows = []
    for k in ("base", "tuned"):
        if k in metrics:
            m = metrics[k]
            ci = m.get("ci95") or [float("nan")] * 2
            rows.append([k, f"**{_fmt(m['perplexity'])}**", f"{_fmt(ci[0], 2)} - {_fmt(ci[1], 2)}",
                         _fmt(m["bits_per_byte"], 4), m["tokens"]])
    out += md_table(["model", "perplexity", "95% CI", "bits/byte", "tokens"], rows)
    if "delta" in metrics:
        d = metrics["delta"]
        verdict = "better" if d["ci95"][1] < 0 else "worse" if d["ci95"][0] > 0 else "not significantly different"
        out += [f"Tuned / base = **{d['ratio']:.3f}**; paired 95% interval of tuned - base: "
                f"{d['ci95'][0]:.2f} to {d['ci95'][1]:.2f} (tuned is {verdict}).", ""]
    return out


def _section_data(prep: dict) -> list[str]:
    out = ["## Data", "", f"{prep['rows_read']} rows read, **{prep['rows_kept']} kept**, {prep['rows_dropped']} dropped.", ""]
    out += md_table(["dropped because", "rows"], [[k, v] for k, v in prep["dropped"].items()] or [["(nothing)", 0]])
    if prep.get("warnings"):
        out += md_table(["kept, field repaired", "rows"], [[k, v] for k, v in prep["warnings"].items()])
    out += md_table(["cleaning rule", "articles changed"], [[k, v] for k, v in prep.get("cleaned", {}).items()])
    out += md_table(["split", "articles", "tokens"], [[k, v["articles"], v["tokens"]] for k, v in prep["splits"].items()])
    return out


def _section_generations(gens: list[dict], base: dict[tuple, str], held_out: list[str], shown: int = 6) -> list[str]:
    """The first ``shown`` completions (with the base model's beside them where generate wrote it), then text
    statistics that compare like with like: base and tuned over the same prompts, held-out text cut to the
    completions' length."""
    out = ["## Generations", ""]
    for g in gens[:shown]:
        out += [f"**{cell(g['id'])}** — _{cell(g['prompt'])}_", ""]
        if _gkey(g) in base:
            out += md_table(["base", "tuned"], [[cell(base[_gkey(g)]), cell(g["completion"])]])
        else:
            out += [f"> {cell(g['completion'])}", ""]
    paired = [g for g in gens if _gkey(g) in base]
    rows = []
    if paired:
        rows.append([f"base model ({len(paired)} prompts)", *_stat_cells(text_stats([base[_gkey(g)] for g in paired]))])
        rows.append([f"tuned, same prompts ({len(paired)})", *_stat_cells(text_stats([g["completion"] for g in paired]))])
    tuned = text_stats([g["completion"] for g in gens])
    if len(paired) < len(gens):
        rows.append([f"tuned, all prompts ({len(gens)})", *_stat_cells(tuned)])
    if held_out and tuned:
        ref = text_stats(_snippets(held_out, max(5, int(tuned["mean_words"]))))
        if ref:
            rows.append(["held-out articles (same length)", *_stat_cells(ref)])
    out += [f"{min(shown, len(gens))} of {len(gens)} completions shown. Text statistics, means over texts "
            "(distinct-n = unique n-grams / n-grams; repetition = share of 4-grams already seen in the same text):", ""]
    out += md_table(["text", *STAT_KEYS], rows)
    return out


def _gkey(g: dict) -> tuple:
    return g["id"], g.get("sample", 0)


def _stat_cells(stats: dict) -> list[str]:
    return [_fmt(stats.get(k)) for k in STAT_KEYS]


def section_judge(p: dict, judge_name: str, title: str = "Fluency and relevance (judge model)") -> list[str]:
    """Base vs tuned on the same prompts: judge scores, paired means with bootstrap intervals (medgen/judge.py)."""
    if not p:
        return []
    f, r = p["log_fluency_perplexity"], p["relevance"]

    def verdict(lo: float, hi: float, better_low: bool) -> str:
        if lo <= 0 <= hi:
            return "no clear difference"
        return "tuned better" if (hi < 0) == better_low else "tuned worse"

    rows = [["fluency: judge perplexity of the completion given its prompt (geometric mean; lower = more fluent)",
             _fmt(math.exp(f["base"]), 2), _fmt(math.exp(f["tuned"]), 2),
             f"x{math.exp(f['difference']):.3f} ({math.exp(f['ci95'][0]):.3f} to {math.exp(f['ci95'][1]):.3f})",
             verdict(*f["ci95"], better_low=True)],
            ["relevance: nats/token the prompt adds to the completion's likelihood (higher = more on topic)",
             _fmt(r["base"]), _fmt(r["tuned"]), f"{r['difference']:+.3f} ({r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f})",
             verdict(*r["ci95"], better_low=False)]]
    return [f"## {title}", "", f"Judge `{judge_name}`, {p['prompts']} prompts completed by both models; paired 95% "
            f"intervals from {p['bootstrap']['resamples']} bootstrap resamples of the prompts. Fluency rewards safe, "
            "repetitive text too; relevance does not say a completion is right.", ""] + md_table(
        ["score", "base", "tuned", "tuned vs base (95% CI)", "verdict"], rows)


STAT_KEYS = ["distinct_1", "distinct_2", "distinct_3", "repetition_4gram", "mean_words"]




def cell(text: str) -> str:
    """Generated or user text as one line of literal Markdown text: every markup character backslash-escaped (a
    completion's code fence or asterisks render as the characters they are, in the .md and the HTML)."""
    return re.sub(r"([\\`*_|\[\]<>#])", r"\\\1", " ".join(text.split()))


def _section_provenance(metrics: dict | None, prep: dict | None) -> list[str]:
    import shlex
    import sys

    rows = [["report command", f"`{shlex.join(['medgen', *sys.argv[1:]])}`"]]
    rows += [[k, v] for k, v in versions().items()]
    if metrics:
        rows += [["model fingerprint", metrics.get("model_fingerprint", "")],
                 ["adapter fingerprint", metrics.get("adapter_fingerprint", "")],
                 ["eval processes", metrics.get("world_size", "")]]
    if prep and "source_files" in prep:  # several source files: one hash each
        rows += [[f"source sha256: {f['url']}", f["sha256"]] for f in prep["source_files"]]
    elif prep:
        rows.append(["source sha256", prep.get("source_sha256", "")])
    return ["## Provenance", ""] + md_table(["item", "value"], rows)


# --------------------------------------------------------------------------- the stage


def run(cfg: Config) -> dict[str, Any]:
    """The report folder as a whole (markdown, HTML, plots): the previous one stays until the new one is complete."""
    final = cfg.layout.report
    with disk_errors(final, "the report", "the previous report, if any, is kept"), atomic.directory(final) as out:
        _write_report(cfg, out)
    return {"report": str(cfg.layout.report_file), "html": str(cfg.layout.report_html)}


def _write_report(cfg: Config, out: Path) -> None:
    layout = cfg.layout
    records = {stage: provenance.read(layout, stage) for stage in ("train", "evaluate", "generate")}
    # the data the run used: where evaluation (else training) read it, not where this command's config points
    ran = provenance.config_of(records["evaluate"] or records["train"]) or cfg
    prep = _prepare_report(ran)
    metrics = read_json(layout.metrics)
    articles = read_jsonl(layout.eval_articles)
    gens = read_jsonl(layout.generations_file)
    lines = [f"# medgen report: {ran.run.name}", ""]
    if metrics and "tuned" in metrics:
        lines += [f"**Tuned perplexity {metrics['tuned']['perplexity']:.2f} vs base {metrics['base']['perplexity']:.2f}** "
                  f"({metrics['delta']['ratio']:.3f}x) on {metrics['base']['articles']} held-out articles.", ""]
    lines += _section_config(records, prep, ran.shards_url)
    if metrics:
        lines += _section_perplexity(metrics)
        for fn, name, title in ((plot_per_tag, "per_tag.png", "perplexity by tag"),
                                (plot_article_nll, "article_nll.png", "per-article NLL")):
            png = fn(metrics, out / name) if fn is plot_per_tag else fn(articles, out / name)
            if png:
                lines += [f"![{title}]({png})", ""]
    train_log = read_jsonl(layout.train_log)
    png = plot_training(train_log, out / "training.png")
    if png:
        lines += ["## Training", ""] + _section_speed(train_log) + [f"![training curves]({png})", ""]
    if prep:
        lines += _section_data(prep)
    if gens:
        base_recs = read_jsonl(layout.base_generations_file)
        base = {_gkey(g): g["completion"] for g in base_recs}
        lines += _section_generations(gens, base, _held_out_texts(ran))
        lines += section_judge(judge.paired(base_recs, gens, ran.eval.bootstrap, ran.eval.seed),
                               next((g.get("judge") for g in gens if g.get("judge")), ""))
    lines += _section_provenance(metrics, prep)
    md = "\n".join(lines)
    (out / layout.report_file.name).write_text(md, encoding="utf-8")
    (out / layout.report_html.name).write_text(to_html(md, out), encoding="utf-8")
    provenance.write(cfg, "report", out)


def to_html(md: str, img_dir: Path) -> str:
    """A small markdown subset (headings, tables, images, bold/italic, quotes) -> one HTML file, images inlined."""
    body, table = [], []

    def inline(s: str) -> str:
        # a backslash-escaped character (cell) is text: set aside before any markup is read, put back as itself
        s = re.sub(r"\\([\\`*_|\[\]<>#])", lambda m: f"\x00{ord(m.group(1))}\x00", s)
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        s = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"<i>\1</i>", s)
        s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
        return re.sub("\x00(\\d+)\x00", lambda m: html.escape(chr(int(m.group(1)))), s)

    def flush() -> None:
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|(---\|)+", r)]
            cells = [[c.strip() for c in r.strip("|").split(" | ")] for r in rows]
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        m = re.fullmatch(r"!\[(.*)\]\((.+)\)", line)
        if m:
            data = base64.b64encode((img_dir / m.group(2)).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("> "):
            body.append(f"<blockquote>{inline(line[2:])}</blockquote>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top}th{background:#f3f3f3}img{max-width:100%}blockquote{color:#444;border-left:3px "
             "solid #ccc;margin:0;padding-left:1em}code{background:#f5f5f5}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>medgen report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
