"""Sweeps (medgen sweep): a grid over the tiny config, run locally and as SLURM job arrays on the two-node test
cluster; every point against a standalone run of its config (bitwise adapters on CPU fp32), one prepare for
all, a point that fails at train time only (validated, but its scheduler rejects its kwargs) reported failed
while the others and the comparison complete, and the comparison's paired intervals recomputed here by hand."""
import json
import math
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from medgen import config, sweep
from medgen.errors import ConfigError
from tests.helpers import adapter, medgen

# 2 x 2: polynomial decay does not take cosine's num_cycles, so exactly one point fails, in training
GRID = ["--grid", "train.lr_scheduler=cosine,polynomial",
        "--grid", "train.sft_args={},{lr_scheduler_kwargs: {num_cycles: 0.5}}"]
SETTINGS = [{"train.lr_scheduler": s, "train.sft_args": a} for s in ("cosine", "polynomial")
            for a in ({}, {"lr_scheduler_kwargs": {"num_cycles": 0.5}})]
FAILING = 3  # polynomial + num_cycles
BASE = ["--config", "configs/tiny.yaml"]


def _name(i: int) -> str:
    return sweep.point_name(SETTINGS[i])


def _overrides(settings: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]


def _bitwise(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory) -> dict[int, Path]:
    """Each point that can train, run alone with `medgen run` (its own prepare, its own run.dir)."""
    base = tmp_path_factory.mktemp("standalone")
    runs = {}
    for i, s in enumerate(SETTINGS):
        if i != FAILING:
            runs[i] = base / str(i)
            medgen("run", *BASE, *_overrides(s), f"run.dir={runs[i]}")
    return runs


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("sweep") / "local"
    proc = medgen("sweep", *BASE, *GRID, f"run.dir={run}")
    return {"dir": run, "proc": proc}


# --------------------------------------------------------------------------- no run needed


def test_grid_arguments_yaml_section_and_point_names(tmp_path):
    assert sweep.parse_grid(["lora.r=8,16", "train.learning_rate=5e-4,1e-3", "lora.target_modules=[c_attn],[c_fc]"]) \
        == {"lora.r": [8, 16], "train.learning_rate": ["5e-4", "1e-3"], "lora.target_modules": [["c_attn"], ["c_fc"]]}
    with pytest.raises(ConfigError, match="expected section.key=value1,value2"):
        sweep.parse_grid(["lora.r"])
    path = tmp_path / "s.yaml"  # a sweep: section, nested or dotted keys alike
    path.write_text("model: {name_or_path: tiny-gpt2}\nsweep:\n  grid:\n    lora: {r: [4, 8]}\n"
                    "    train.learning_rate: [5e-4, 1e-3]\n")
    cfg = config.load_config(str(path), [f"run.dir={tmp_path / 'sw'}"])
    pts = sweep.points(cfg)
    assert [p.name for p in pts] == ["lora.r=4,train.learning_rate=5e-4", "lora.r=4,train.learning_rate=1e-3",
                                     "lora.r=8,train.learning_rate=5e-4", "lora.r=8,train.learning_rate=1e-3"]
    p = pts[3]
    assert (p.cfg.lora.r, p.cfg.train.learning_rate, p.cfg.run.dir) == (8, 1e-3, str(tmp_path / "sw" / p.name))
    assert p.cfg.data.shards == str(tmp_path / "sw" / "data") and p.cfg.sweep.grid == {}  # one dataset for all
    assert _name(FAILING) == "train.lr_scheduler=polynomial,train.sft_args=lr_scheduler_kwargs:num_cycles:0.5"


def test_every_problem_of_every_point_is_reported_at_once(tmp_path):
    proc = medgen("sweep", *BASE, "--grid", "lora.r=0,8", "--grid", "train.max_steps=0,4", "--grid",
                  "data.num_shards=1,2", "--grid", "lora.rank=1", f"run.dir={tmp_path / 's'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    for culprit in ("sweep.grid.data.num_shards: the same for every point", "sweep.grid.lora.rank: unknown key",
                    "point lora.r=0,train.max_steps=0: lora.r: must be > 0",
                    "point lora.r=0,train.max_steps=0: train.max_steps: must be > 0",
                    "point lora.r=8,train.max_steps=0: train.max_steps", "point lora.r=0,train.max_steps=4: lora.r"):
        assert any(culprit in ln for ln in lines), (culprit, lines)
    assert not (tmp_path / "s").exists()  # nothing ran


def test_dry_run_shows_arrays_throttle_and_elementwise_dependencies(tmp_path):
    proc = medgen("sweep", *BASE, *GRID, "--executor", "slurm", "--dry-run", "slurm.array_parallelism=2",
                  f"run.dir={tmp_path / 's'}")
    scripts = dict(zip(["prepare", "train", "evaluate", "generate", "report", "compare"],
                       proc.stdout.split("#!/bin/bash")[1:]))
    assert "--array" not in scripts["prepare"] + scripts["compare"]
    assert "#SBATCH --dependency='afterok:<prepare job id>'" in scripts["train"]
    for stage, before in (("evaluate", "train"), ("generate", "evaluate"), ("report", "generate")):
        assert f"#SBATCH --dependency='aftercorr:<{before} job id>'" in scripts[stage]
    for stage in ("train", "evaluate", "generate", "report"):
        assert "#SBATCH --array=0-3%2" in scripts[stage] and "%A_%a_0_log.out" in scripts[stage]
    assert "afterany:<prepare job id>:<train job id>:<evaluate job id>:<generate job id>:<report job id>" \
        in scripts["compare"]
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- local


def _check_sweep_outputs(run: Path, standalone: dict[int, Path]) -> None:
    """Each point equals its standalone run; one prepared dataset; the failed point is named in the report."""
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("manifest.json")) == ["data/manifest.json"]
    for i, alone in standalone.items():
        point = run / _name(i)
        assert _bitwise(adapter(point), adapter(alone)), _name(i)
        mine, theirs = (json.loads((r / "eval" / "metrics.json").read_text()) for r in (point, alone))
        for key in ("perplexity", "nll_sum", "tokens", "ci95"):
            assert mine["tuned"][key] == theirs["tuned"][key], (i, key)
        assert (point / "report" / "report.md").exists()
    assert not (run / _name(FAILING) / "adapter").exists()
    res = json.loads((run / "report" / "compare.json").read_text())
    status = {r["name"]: r["status"] for r in res["points"]}
    assert status == {_name(i): "failed" if i == FAILING else "completed" for i in range(4)}
    failed = next(r for r in res["points"] if r["status"] == "failed")
    assert failed["failed_stage"] == "train"
    md = (run / "report" / "compare.md").read_text()
    assert "## Failed points" in md and _name(FAILING) in md and "## Completions" in md
    html = (run / "report" / "compare.html").read_text()
    assert "data:image/png;base64," in html and 'src="losses.png"' not in html  # self-contained


@pytest.mark.slow
def test_local_sweep_points_equal_standalone_runs_and_prepare_ran_once(local_sweep, standalone):
    run, proc = local_sweep["dir"], local_sweep["proc"]
    assert proc.stderr.count("prepare: start") == 1 and proc.stderr.count("train: start") == 4
    assert f"failed points: {_name(FAILING)}" in proc.stdout
    _check_sweep_outputs(run, standalone)
    failed = next(r for r in json.loads((run / "report" / "compare.json").read_text())["points"]
                  if r["status"] == "failed")
    assert "TypeError" in failed["error"] and "num_cycles" in failed["error"]
    status = medgen("status", str(run), check=False)
    assert status.returncode == 1 and f"point {_name(FAILING)} failed in train: TypeError" in status.stdout


def _percentile(values: list[float], q: float) -> float:
    """numpy's default (linear) percentile, by hand."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


@pytest.mark.slow
def test_paired_intervals_match_a_plain_computation_from_articles_jsonl(local_sweep):
    run = local_sweep["dir"]
    res = json.loads((run / "report" / "compare.json").read_text())
    cfg = config.load_config("configs/tiny.yaml")
    assert res["bootstrap"]["resamples"] == cfg.eval.bootstrap and res["bootstrap"]["seed"] == cfg.eval.seed
    rows = {i: [json.loads(x) for x in (run / _name(i) / "eval" / "articles.jsonl").read_text().splitlines()]
            for i in range(4) if i != FAILING}
    n, b = len(rows[0]), cfg.eval.bootstrap
    assert n == res["articles"] and all([r["id"] for r in v] == [r["id"] for r in rows[0]] for v in rows.values())
    # the documented draws: article counts of each resample, multinomial from one seeded generator
    draws = np.random.default_rng(cfg.eval.seed).multinomial(n, [1.0 / n] * n, size=b).tolist()

    def ppl(articles: list[dict], key: str, counts: list[int]) -> float:
        nll = sum(c * a[f"{key}_nll"] for c, a in zip(counts, articles))
        return math.exp(nll / sum(c * a["tokens"] for c, a in zip(counts, articles)))

    reps = {i: [ppl(v, "tuned", c) for c in draws] for i, v in rows.items()}
    reps["base"] = [ppl(rows[0], "base", c) for c in draws]
    whole = {i: ppl(v, "tuned", [1] * n) for i, v in rows.items()}
    # the best point is chosen on validation (each point's record of its adapter's validation score), not on test
    val = {i: json.loads((run / _name(i) / "adapter" / "medgen_config.json").read_text())["resolved"]["validation"]
           ["perplexity"] for i in rows}
    best = min(val, key=val.get)
    assert res["best"] == _name(best) and res["chosen_on"] == "validation"
    for i, v in rows.items():
        row = next(r for r in res["points"] if r["name"] == _name(i))
        assert row["perplexity"] == pytest.approx(whole[i], rel=1e-12)
        assert row["ci95"] == pytest.approx([_percentile(reps[i], 2.5), _percentile(reps[i], 97.5)], rel=1e-9)
        for other, key in ((best, "vs_best"), ("base", "vs_base")):
            diff = [x - y for x, y in zip(reps[i], reps[other])]
            assert row[key]["ci95"] == pytest.approx([_percentile(diff, 2.5), _percentile(diff, 97.5)],
                                                     rel=1e-9, abs=1e-9), (i, key)
        assert row["vs_base"]["difference"] == pytest.approx(whole[i] - ppl(v, "base", [1] * n), rel=1e-9)


@pytest.mark.slow
def test_the_best_point_is_chosen_on_validation_and_reported_on_test(tmp_path):
    """A grid of seeds whose validation-best and test-best points differ (checked here from the points' own files):
    the comparison names the validation-best, says so, and still reports every point's test perplexity."""
    run = tmp_path / "seeds"
    # one data stream: the sample order under which these four seeds were found to disagree
    medgen("sweep", *BASE, f"run.dir={run}", "train.data_streams=1", "--grid", "train.seed=1,2,3,4")
    res = json.loads((run / "report" / "compare.json").read_text())
    names = [f"train.seed={i}" for i in (1, 2, 3, 4)]
    val = {n: json.loads((run / n / "adapter" / "medgen_config.json").read_text())["resolved"]["validation"]
           ["perplexity"] for n in names}
    test = {n: json.loads((run / n / "eval" / "metrics.json").read_text())["tuned"]["perplexity"] for n in names}
    assert min(val, key=val.get) != min(test, key=test.get), (val, test)  # the construction holds
    assert res["best"] == min(val, key=val.get) and res["chosen_on"] == "validation"
    assert {r["name"]: r["perplexity"] for r in res["points"]} == pytest.approx(test, rel=1e-12)
    md = (run / "report" / "compare.md").read_text()
    assert f"**Best: `{res['best']}`**, chosen by the lowest validation perplexity" in md
    assert "The test articles played no part in the choice." in md


# --------------------------------------------------------------------------- SLURM


def _wait_all(info: dict, timeout: float = 900) -> None:
    ids = ",".join(s["job_id"] for s in info["stages"].values())
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-o", "%i", "-j", ids], capture_output=True, text=True).stdout.split():
        assert time.time() < deadline, f"sweep not finished after {timeout} s"
        time.sleep(3)
    time.sleep(3)  # sacct lags a second or two behind squeue


def _element(states: dict[str, str], array: str, i: int) -> str | None:
    """An element's own record, else the array's (123_[0-3%4]: the elements never split off, e.g. cancelled
    while pending)."""
    return states.get(f"{array}_{i}") or next((v for k, v in states.items() if k.startswith(f"{array}_[")), None)


def _sacct(info: dict) -> dict[str, str]:
    ids = ",".join(s["job_id"] for s in info["stages"].values())
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", info["submitted"], "-o", "JobID,State", "-j", ids],
                         capture_output=True, text=True, check=True).stdout
    return dict(ln.split("|") for ln in out.splitlines())


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_runs_job_arrays_and_reports_the_failed_element(slurm_cluster, standalone, tmp_path):
    run = tmp_path / "slurm"
    # one node per element: each point trains on one process, as its standalone run did
    medgen("sweep", *BASE, *GRID, "--executor", "slurm", f"run.dir={run}", "slurm.nodes=1")
    info = json.loads((run / "slurm" / "jobs.json").read_text())
    _wait_all(info)
    states = {k: v.split()[0] for k, v in _sacct(info).items()}
    stages = info["stages"]
    assert list(stages) == ["prepare", "train", "evaluate", "generate", "report", "compare"]
    assert "elements" not in stages["prepare"]  # one prepare for every point
    train = stages["train"]["job_id"]
    assert [states.get(f"{train}_{i}") for i in range(4)] == \
        ["FAILED" if i == FAILING else "COMPLETED" for i in range(4)], states  # sacct shows the array elements
    for stage in ("evaluate", "generate", "report"):  # element-wise: only the failed point's are cancelled
        a = stages[stage]["job_id"]
        assert [_element(states, a, i) for i in range(4)] == \
            ["COMPLETED"] * FAILING + ["CANCELLED"], (stage, states)
    assert states[stages["prepare"]["job_id"]] == states[stages["compare"]["job_id"]] == "COMPLETED"
    _check_sweep_outputs(run, standalone)

    status = medgen("status", str(run), check=False)
    failed_log = stages["train"]["logs"][FAILING][0]
    assert status.returncode == 1
    assert f"point {_name(FAILING)}: train failed (FAILED, SLURM exit code 1:0): see {failed_log}" in status.stdout
    cause = "get_polynomial_decay_schedule_with_warmup() got an unexpected keyword argument 'num_cycles'"
    assert cause in Path(failed_log).read_text()
    lines = status.stdout.splitlines()
    shown = lines[next(i for i, x in enumerate(lines) if x.startswith(f"point {_name(FAILING)}: train failed")) + 1]
    assert cause in shown  # the error under the failed point, not only in its log
    res = json.loads((run / "report" / "compare.json").read_text())
    assert next(r for r in res["points"] if r["status"] == "failed")["log"] == failed_log
    assert failed_log in (run / "report" / "compare.md").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_preempted_element_alone_is_requeued_and_resumes_exactly(slurm_cluster, tmp_path):
    from submitit.slurm.slurm import SlurmJob

    from tests.test_train import max_diff, _samples

    run, steps = tmp_path / "pre", 12
    # two points that train the same adapter (they differ in generation only): point 1 is point 0 uninterrupted
    args = ["sweep", *BASE, "--grid", "generate.max_new_tokens=8,12", "--executor", "slurm", f"run.dir={run}",
            "slurm.nodes=1", f"train.max_steps={steps}", "slurm.stages=[prepare,train]"]
    medgen(*args)
    again = medgen(*args, check=False)  # a second sweep on the same directory would train into the same points
    assert again.returncode == 2 and "already has a SLURM chain queued or running" in again.stderr
    info = json.loads((run / "slurm" / "jobs.json").read_text())
    train = info["stages"]["train"]
    progress, deadline = run / "generate.max_new_tokens=8" / "samples" / "rank-00000.jsonl", time.time() + 600
    while not (progress.exists() and len(progress.read_text().splitlines()) >= 2):
        assert time.time() < deadline, "point 0 made no progress"
        time.sleep(0.2)
    SlurmJob(folder=info["folder"], job_id=train["elements"][0], tasks=[0])._interrupt()  # as on preemption
    _wait_all(info)

    out = subprocess.run(["sacct", "-X", "-n", "-P", "--duplicates", "-S", info["submitted"], "-o", "JobID,State",
                          "-j", train["job_id"]], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(out) == sorted([f"{train['job_id']}_0|REQUEUED", f"{train['job_id']}_0|COMPLETED",
                                  f"{train['job_id']}_1|COMPLETED"]), out  # only the preempted element
    log_text = Path(train["logs"][0][0]).read_text()
    resumed = re.findall(r"resuming from \S+/step-(\d+)", log_text)
    assert len(resumed) == 1 and 2 <= int(resumed[0]) < steps and f"Requeued job {train['elements'][0]}" in log_text
    a, b = (run / f"generate.max_new_tokens={n}" for n in (8, 12))
    assert "resuming from" not in Path(train["logs"][1][0]).read_text()
    assert max_diff(adapter(a), adapter(b)) <= 1e-6
    assert _samples(a, steps) == _samples(b, steps)  # no block trained twice or skipped
    res = json.loads((run / "report" / "compare.json").read_text())
    assert [r["status"] for r in res["points"]] == ["completed", "completed"]  # compare ran after the train array


def test_the_headline_names_the_points_the_best_cannot_be_told_apart_from():
    """A constructed comparison: b's paired interval against the best includes 0, c's does not."""
    from medgen import compare

    res = {"best": "a", "points": [{"name": "a", "vs_best": {"difference": 0.0, "ci95": [0.0, 0.0]}},
                                   {"name": "b", "vs_best": {"difference": 1.0, "ci95": [-0.5, 2.0]}},
                                   {"name": "c", "vs_best": {"difference": 3.0, "ci95": [1.0, 4.0]}},
                                   {"name": "d", "status": "failed"}]}
    lines = compare._indistinguishable(res)
    assert lines[0].startswith("**Not distinguishable** on the test articles: `a` and `b` (the paired 95% interval")
    res["points"][1]["vs_best"]["ci95"] = [0.1, 2.0]
    assert compare._indistinguishable(res) == []


def test_a_resumed_points_training_time_counts_every_call():
    from medgen.compare import _train_time

    one_call = [{"step": 1, "time": 10.0, "loss": 2.0}, {"step": 2, "time": 20.0, "loss": 1.9},
                {"step": 2, "time": 20.5, "train_runtime": 12.5}]
    assert _train_time(one_call) == 12.5
    # stopped by SIGTERM after step 2 (the Trainer logged that call's runtime), resumed to step 4
    resumed = [*one_call, {"step": 3, "time": 90.0, "loss": 1.8}, {"step": 4, "time": 95.0, "loss": 1.7},
               {"step": 4, "time": 95.5, "train_runtime": 7.0}]
    assert _train_time(resumed) == 19.5
    assert _train_time([r for r in resumed if "train_runtime" not in r]) == 85.0  # no runtime logged: first to last
