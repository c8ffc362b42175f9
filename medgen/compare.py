"""A sweep's comparison report: ``<sweep dir>/report/compare.md``, a self-contained ``compare.html`` and
``compare.json``, from what each point's stages wrote (eval/articles.jsonl, metrics.json, train_log.jsonl,
generations.jsonl).

Statistics (docs/sweep.md): every point scored the same test articles, so one set of bootstrap replicates
(``eval.bootstrap`` resamples of the articles with replacement, seeded by ``eval.seed``, drawn once as
evaluate.bootstrap_counts draws them) is applied to every point and to the base model alike. A replicate's
perplexity is exp(sum of resampled NLL / sum of resampled tokens); a paired difference is the difference of
two runs' perplexities within each replicate; intervals are the 2.5 and 97.5 percentiles.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from medgen import atomic, evaluate, judge, provenance, report, sweep
from medgen.config import Config
from medgen.data.storage import disk_errors
from medgen.launch import records
from medgen.layout import RunLayout, SweepLayout

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- statistics


def replicates(rows: list[dict], key: str, counts: np.ndarray) -> np.ndarray:
    """Perplexity of ``key`` ('base' or 'tuned') NLL in each bootstrap replicate (one row of ``counts``)."""
    nll = np.array([r[f"{key}_nll"] for r in rows], dtype=np.float64)
    tok = np.array([r["tokens"] for r in rows], dtype=np.float64)
    return evaluate.resampled_ppl(counts, nll, tok)


def point_ppl(rows: list[dict], key: str) -> float:
    """exp(sum NLL / sum tokens) over every article once (fsum, as evaluate sums them)."""
    return math.exp(math.fsum(r[f"{key}_nll"] for r in rows) / sum(r["tokens"] for r in rows))


def paired(a: np.ndarray, b: np.ndarray) -> list[float]:
    """95% interval of a - b over the same replicates."""
    return evaluate.interval(a - b)


# --------------------------------------------------------------------------- inputs


def _train_time(rows: list[dict]) -> float | None:
    """The Trainer's own train_runtime, summed over the calls that trained the run (a run stopped by a signal and
    resumed, or extended, logs one per call; a kill -9 logs none for its call), else first to last logged step."""
    runtimes = [float(r["train_runtime"]) for r in rows if "train_runtime" in r]
    if runtimes:
        return sum(runtimes)
    times = [r["time"] for r in rows if "time" in r]
    return times[-1] - times[0] if len(times) > 1 else None


def _failure(i: int, stage: str, sweep_dir: Path) -> dict[str, str]:
    """Where to look: the SLURM log of the failed element, or the error a local sweep recorded."""
    stages = records.sweep_jobs(sweep_dir).get("stages", {})
    if "elements" in stages.get(stage, {}):
        return {"log": records.failed_log(stages[stage]["logs"][i])}
    local = SweepLayout(sweep_dir).local_status
    if local.exists():
        name = sweep.read_manifest(sweep_dir)["points"][i]["name"]
        rec = json.loads(local.read_text()).get(name, {}).get(stage, {})
        return {"error": rec.get("error", "")}
    return {}


def _submitted_stages(sweep_dir: Path) -> list[str]:
    """The point stages that ran: on SLURM those slurm.stages named, locally all."""
    stages = records.sweep_jobs(sweep_dir).get("stages")
    return [s for s in stages if s in sweep.POINT_STAGES] if stages else list(sweep.POINT_STAGES)


def load_point(p: dict, sweep_dir: Path, stages: list[str]) -> dict[str, Any]:
    layout = RunLayout(Path(p["run_dir"]))
    done = {s: layout.finished(s) for s in sweep.POINT_STAGES}
    missing = [s for s in stages if not done[s]]
    out: dict[str, Any] = {"index": p["index"], "name": p["name"], "settings": p["settings"],
                           "run_dir": p["run_dir"], "status": "failed" if missing else "completed"}
    if missing:
        out.update({"failed_stage": missing[0], **_failure(p["index"], missing[0], sweep_dir)})
    out["metrics"] = report.read_json(layout.metrics) if done["evaluate"] else None
    out["articles"] = report.read_jsonl(layout.eval_articles) if done["evaluate"] else []
    out["train_log"] = report.read_jsonl(layout.train_log)
    trained = provenance.read(layout, "train") if done["train"] else None
    out["validation"] = (trained or {}).get("resolved", {}).get("validation") or None  # of the saved adapter
    out["generations"] = report.read_jsonl(layout.generations_file) if done["generate"] else []
    out["base_generations"] = report.read_jsonl(layout.base_generations_file) if done["generate"] else []
    return out


# --------------------------------------------------------------------------- the comparison

BASE = "\0base"  # the base model's key among the points' (no point name holds a NUL)


def compare(cfg: Config) -> dict[str, Any]:
    """compare.json's content; ``_points`` keeps what was loaded for the report (not written to the JSON)."""
    sweep_dir = Path(cfg.run.dir)
    manifest = sweep.read_manifest(sweep_dir)
    pts = [load_point(p, sweep_dir, _submitted_stages(sweep_dir)) for p in manifest["points"]]
    scored = [p for p in pts if p["articles"] and "tuned_nll" in p["articles"][0]]
    out: dict[str, Any] = {
        "sweep_dir": str(sweep_dir), "grid": manifest["grid"], "split": cfg.eval.split, "articles": 0,
        "bootstrap": {"resamples": cfg.eval.bootstrap, "seed": cfg.eval.seed, "unit": "article",
                      "draws": "evaluate.bootstrap_counts(articles, resamples, seed)", "interval": "percentile 95%",
                      "paired": "every run's perplexity from the same resampled articles in each replicate"},
        "base": None, "best": None, "chosen_on": None, "points": [], "_points": pts}
    if not scored:
        out["points"] = [_row(p, {}, {}, None, cfg.eval.bootstrap, cfg.eval.seed) for p in pts]
        return out
    ref = scored[0]["articles"]  # the base model is the same in every point: scored with the adapter off
    ids = [r["id"] for r in ref]
    counts = evaluate.bootstrap_counts(len(ref), cfg.eval.bootstrap, cfg.eval.seed)
    same = [p for p in scored if [r["id"] for r in p["articles"]] == ids]
    boots = {p["name"]: replicates(p["articles"], "tuned", counts) for p in same}
    boots[BASE] = replicates(ref, "base", counts)
    ppl = {p["name"]: point_ppl(p["articles"], "tuned") for p in same} | {BASE: point_ppl(ref, "base")}
    # chosen on validation, measured on test: choosing on the test set would bias the reported best low
    chosen_on = "validation" if all(p["validation"] for p in same) else out["split"]
    choose = (lambda n: next(p for p in same if p["name"] == n)["validation"]["perplexity"]) \
        if chosen_on == "validation" else ppl.__getitem__
    best = min((p["name"] for p in same), key=choose)
    out.update(articles=len(ref), best=best, chosen_on=chosen_on, base={
        "perplexity": ppl[BASE], "ci95": evaluate.interval(boots[BASE]), "from_point": scored[0]["name"],
        "bits_per_byte": scored[0]["metrics"]["base"]["bits_per_byte"]})
    out["points"] = [_row(p, boots, ppl, best, cfg.eval.bootstrap, cfg.eval.seed) for p in pts]
    return out


def _row(p: dict, boots: dict, ppl: dict, best: str | None, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    tps = [r["tokens_per_s"] for r in p["train_log"] if "tokens_per_s" in r]
    row = {k: p[k] for k in ("index", "name", "settings", "run_dir", "status", "failed_stage", "log", "error")
           if k in p}
    row.update(train_seconds=_train_time(p["train_log"]), tokens_per_s=statistics.median(tps) if tps else None,
               validation=p["validation"],
               judge=judge.paired(p["base_generations"], p["generations"], resamples, seed) or None)
    name = p["name"]
    if name in boots:
        row.update(perplexity=ppl[name], ci95=evaluate.interval(boots[name]),
                   bits_per_byte=p["metrics"]["tuned"]["bits_per_byte"],
                   vs_best={"difference": ppl[name] - ppl[best], "ci95": paired(boots[name], boots[best])},
                   vs_base={"difference": ppl[name] - ppl[BASE], "ci95": paired(boots[name], boots[BASE])})
    elif p["articles"]:
        row["note"] = "scored other articles than the first scored point: no paired comparison"
    return row


# --------------------------------------------------------------------------- the report


def run(cfg: Config) -> dict[str, Any]:
    """The stage: <sweep dir>/report/ (compare.md, compare.html, compare.json, plots) replaced as a whole."""
    result = compare(cfg)
    where = SweepLayout(Path(cfg.run.dir))
    with disk_errors(where.report, "the comparison report", "the previous one, if any, is kept"), \
            atomic.directory(where.report) as out:
        pts = result.pop("_points")
        (out / where.comparison_json.name).write_text(json.dumps(result, indent=2), encoding="utf-8")
        md = "\n".join(_markdown(cfg, result, pts, out))
        (out / where.comparison.name).write_text(md, encoding="utf-8")
        (out / where.comparison_html.name).write_text(report.to_html(md, out), encoding="utf-8")
    failed = [r["name"] for r in result["points"] if r["status"] != "completed"]
    log.info("compare: %d points, best %s%s", len(result["points"]), result["best"],
             f", failed: {', '.join(failed)}" if failed else "")
    return {"report": str(where.comparison), "html": str(where.comparison_html),
            "json": str(where.comparison_json), "best": result["best"], "failed": failed}


def _ci(x: list[float] | None, d: int = 2) -> str:
    return f"{x[0]:.{d}f} to {x[1]:.{d}f}" if x else "n/a"


def _diff(v: dict | None) -> str:
    if not v:
        return "n/a"
    lo, hi = v["ci95"]
    mark = "" if lo <= 0 <= hi else " *"  # the interval excludes 0
    return f"{v['difference']:+.3f} ({lo:+.3f} to {hi:+.3f}){mark}"


def _markdown(cfg: Config, res: dict, pts: list[dict], out: Path) -> list[str]:
    b = res["bootstrap"]
    lines = [f"# medgen sweep: {cfg.run.name}", ""]
    if res["best"]:
        best = next(r for r in res["points"] if r["name"] == res["best"])
        if res["chosen_on"] == "validation":
            v = best["validation"]
            lines += [f"**Best: `{best['name']}`**, chosen by the lowest validation perplexity ({v['perplexity']:.3f} on "
                      f"{v['articles']} validation articles, at its adapter's step {v['step']}); measured on the test "
                      f"split: **perplexity {best['perplexity']:.3f}** (base {res['base']['perplexity']:.3f}) on "
                      f"{res['articles']} `{res['split']}` articles; {len(res['points'])} points. The test articles "
                      "played no part in the choice.", ""]
        else:
            lines += [f"**Best: `{best['name']}`, perplexity {best['perplexity']:.3f}** (base "
                      f"{res['base']['perplexity']:.3f}) on {res['articles']} `{res['split']}` articles; "
                      f"{len(res['points'])} points. Chosen on the `{res['split']}` split itself (not every point "
                      "validated during training: train.validate): its perplexity is biased low as an estimate.", ""]
    lines += _indistinguishable(res)
    lines += _points_table(res)
    lines += [f"Perplexity = exp(sum of token NLL / tokens) over the articles. Intervals: {b['resamples']} bootstrap "
              f"resamples of the articles (seed {b['seed']}), the same resamples for every point and the base model, "
              "so differences are paired; 95% percentile intervals. * = the interval of the difference excludes 0.", ""]
    failed = [r for r in res["points"] if r["status"] != "completed"]
    if failed:
        lines += ["## Failed points", ""]
        lines += [f"- `{r['name']}`: failed in {r['failed_stage']}" + (f"; log `{r['log']}`" if r.get("log") else "")
                  + (f": {report.cell(r['error'])}" if r.get("error") else "") for r in failed] + [""]
    png = plot_losses(pts, out / "losses.png")
    if png:
        lines += ["## Loss curves", "", f"![train and validation loss of every point]({png})", ""]
    lines += _judge_table(res)
    best_pt = next((p for p in pts if p["name"] == res["best"]), None)
    if best_pt and report.plot_per_tag(best_pt["metrics"], out / "per_tag.png"):
        lines += ["## Perplexity by tag: best point (tuned) vs base", "", "![perplexity by tag](per_tag.png)", ""]
    return lines + _completions(pts)


def _indistinguishable(res: dict) -> list[str]:
    """The points the best one cannot be told apart from on the test articles (paired interval includes 0)."""
    close = [r["name"] for r in res["points"] if r["name"] != res["best"] and r.get("vs_best")
             and r["vs_best"]["ci95"][0] <= 0 <= r["vs_best"]["ci95"][1]]
    if not close:
        return []
    return [f"**Not distinguishable** on the test articles: `{res['best']}` and {', '.join(f'`{n}`' for n in close)} "
            "(the paired 95% interval of each difference includes 0); more test articles, or another criterion, "
            "would have to decide between them.", ""]


def _points_table(res: dict) -> list[str]:
    keys = list(res["grid"])
    rows = []
    for r in res["points"]:
        settings = [f"`{sweep.label(r['settings'][k]).replace('|', '¦')}`" for k in keys]  # a code span: no escapes
        if "perplexity" not in r:
            rows.append([*settings, r["status"] + (f" ({r['failed_stage']})" if "failed_stage" in r else ""),
                         *["n/a"] * 8])
            continue
        tps, secs, v = r["tokens_per_s"], r["train_seconds"], r.get("validation")
        val = f"{v['perplexity']:.3f}" if v else "n/a"
        rows.append([*settings, r["status"], f"**{val}**" if r["name"] == res["best"] and v else val,
                     f"{r['perplexity']:.3f}", _ci(r["ci95"]), f"{r['bits_per_byte']:.4f}",
                     f"{secs:.1f}" if secs is not None else "n/a", f"{tps:,.0f}" if tps else "n/a",
                     _diff(r["vs_best"]), _diff(r["vs_base"])])
    head = [*keys, "status", "validation ppl", "test perplexity", "95% CI", "bits/byte", "train s", "tokens/s",
            "vs best (95% CI)", "vs base (95% CI)"]
    return report.md_table(head, rows)


def _judge_table(res: dict) -> list[str]:
    """Each point's completions against the base model's on the same prompts: judge scores, paired (judge.py)."""
    rows = []
    for r in res["points"]:
        j = r.get("judge")
        if not j:
            continue
        f, rel = j["log_fluency_perplexity"], j["relevance"]
        rows.append([f"`{r['name']}`", j["prompts"],
                     f"x{math.exp(f['difference']):.3f} ({math.exp(f['ci95'][0]):.3f} to {math.exp(f['ci95'][1]):.3f})",
                     f"{rel['difference']:+.3f} ({rel['ci95'][0]:+.3f} to {rel['ci95'][1]:+.3f})"])
    if not rows:
        return []
    return ["## Fluency and relevance vs the base model", "",
            "Judge scores of each point's completions against the base model's on the same prompts (medgen/judge.py): "
            "fluency as the ratio of judge perplexities (below 1 = more fluent), relevance as the difference in "
            "nats/token (above 0 = more on topic); paired 95% bootstrap intervals over the prompts.", ""] + report.md_table(
        ["point", "prompts", "fluency ratio tuned/base (95% CI)", "relevance tuned - base (95% CI)"], rows)


def plot_losses(pts: list[dict], out: Path) -> str | None:
    curves = [(p["name"], [(r["step"], r["loss"]) for r in p["train_log"] if "loss" in r],
               [(r["step"], r["eval_loss"]) for r in p["train_log"] if "eval_loss" in r]) for p in pts]
    curves = [(n, c, v) for n, c, v in curves if c]
    if not curves:
        return None
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, c, v in curves:
        line, = ax.plot(*zip(*c), marker=".", alpha=0.5, label=f"{name} (train)")
        if v:
            ax.plot(*zip(*v), marker="o", linestyle="--", color=line.get_color(), label=f"{name} (validation)")
    ax.set(title="loss: train (solid) and validation (dashed)", xlabel="step", ylabel="loss (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.name


def _completions(pts: list[dict], prompts: int = 4) -> list[str]:
    """The same prompts' completions, one row per point."""
    done = [p for p in pts if p["generations"]]
    if not done:
        return []
    lines = ["## Completions", ""]
    for g in done[0]["generations"][:prompts]:
        key = (g["id"], g.get("sample", 0))
        lines += [f"**{g['id']}**: _{report.cell(g['prompt'])}_", ""]
        rows = [[f"`{p['name']}`", report.cell(next((x["completion"] for x in p["generations"]
                                                      if (x["id"], x.get("sample", 0)) == key), ""))] for p in done]
        lines += report.md_table(["point", "completion"], rows)
    return lines
