"""Validation during training (medgen/validate.py): the evaluate stage's exact number, no effect on training,
early stopping at the step the rule says, the best checkpoint kept through rotation and a preemption."""
import json
import math
import os
import signal
import subprocess
import time

import pytest

from tests.helpers import ROOT, TINY, adapter, command, env, max_diff, medgen

pytestmark = pytest.mark.slow  # training runs


def _train(run_dir, shards, *extra, check=True):
    return medgen("train", *TINY, f"run.dir={run_dir}", f"data.shards={shards}", "train.max_steps=8",
                  "train.warmup_steps=2", "train.batch_size=4", "lora.dropout=0.05", *extra, check=check,
                  env={"OMP_NUM_THREADS": "1"})


def _log(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]


def _record(run_dir) -> dict:
    return json.loads((run_dir / "adapter" / "medgen_config.json").read_text())["resolved"]


def test_validation_is_evaluates_number_and_changes_nothing_in_training(tmp_path, tiny_run):
    shards = tiny_run / "data"
    on = tmp_path / "on"
    _train(on, shards, "train.eval_steps=2", "train.eval_tokens=2000", "train.final_adapter=last")
    off = tmp_path / "off"
    _train(off, shards, "train.validate=false")
    # with validation on and off the adapter is the same, bit for bit, and so is every step's data
    a, b = adapter(on), adapter(off)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert (on / "samples" / "rank-00000.jsonl").read_text() == (off / "samples" / "rank-00000.jsonl").read_text()
    assert not any("eval_loss" in r for r in _log(off))
    losses = [[(r["step"], r["loss"]) for r in _log(run) if "loss" in r] for run in (on, off)]
    assert losses[0] == losses[1] and [s for s, _ in losses[1]] == list(range(1, 9))  # every step's loss logged
    # data seen, not epochs: tokens trained on, and that as a share of the training split the stream reads
    # (its tokens plus one separator per article), against the manifest
    split = json.loads((shards / "manifest.json").read_text())["splits"]["train"]
    steps = [r for r in _log(off) if "loss" in r]
    assert steps and all("epoch" not in r for r in steps)
    for r in steps:
        assert r["tokens_seen"] == r["step"] * 4 * 64
        assert r["train_fraction"] == pytest.approx(r["tokens_seen"] / (split["tokens"] + split["articles"]), abs=1e-6)
    val = [r for r in _log(on) if "eval_loss" in r]
    assert [r["step"] for r in val] == [2, 4, 6, 8]
    assert all(r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12) for r in val)
    rec = _record(on)["validation"]
    assert rec["step"] == 8 and rec["articles"] >= 2 and rec["perplexity"] == pytest.approx(val[-1]["eval_perplexity"])
    # the number logged for the final adapter is what `medgen evaluate` says of it on the same articles
    medgen("evaluate", *TINY, f"run.dir={on}", f"data.shards={shards}", "eval.split=validation",
           f"eval.max_articles={rec['articles']}")
    metrics = json.loads((on / "eval" / "metrics.json").read_text())
    assert metrics["tuned"]["tokens"] == val[-1]["eval_tokens"] and metrics["tuned"]["articles"] == rec["articles"]
    assert metrics["tuned"]["perplexity"] == pytest.approx(rec["perplexity"], rel=1e-6)
    assert metrics["training"] == {"adapter_step": 8, "adapter_choice": "last step", "steps": 8,
                                   "stopped": "train.max_steps reached"}


def _rule(losses: list[tuple[int, float]], patience: int, min_delta: float) -> tuple[int, int]:
    """(best step, stop step) of the documented rule, from the logged validation losses."""
    best, best_step, bad = None, 0, 0
    for step, loss in losses:
        if best is None or loss < best - min_delta:
            best, best_step, bad = loss, step, 0
        else:
            bad += 1
        if bad >= patience:
            return best_step, step
    return best_step, losses[-1][0]


EARLY = ("train.max_steps=16", "train.eval_steps=2", "train.early_stopping_patience=2",
         "train.early_stopping_min_delta=0.5",  # the tiny model never improves by half a nat: a stop is certain
         "train.save_steps=1", "train.keep_checkpoints=1")


def test_early_stopping_stops_where_the_rule_says_and_keeps_the_best_checkpoint(tmp_path, tiny_run):
    run = tmp_path / "run"
    _train(run, tiny_run / "data", *EARLY)
    val = [(r["step"], r["eval_loss"]) for r in _log(run) if "eval_loss" in r]
    best, stop = _rule(val, 2, 0.5)
    assert (best, stop) == (2, 6) and val[-1][0] == stop  # no evaluation after the stop
    rec = _record(run)
    assert rec["steps"] == stop and rec["adapter_step"] == best and rec["adapter_choice"] == "best validation loss"
    assert rec["stopped"].startswith(f"early stopping at step {stop}: ")
    # keep_checkpoints=1 rotated every other step away, never the best one
    kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert kept == sorted([f"step-{best}", f"step-{stop}"])
    from safetensors.torch import load_file

    saved = load_file(str(run / "checkpoints" / f"step-{best}" / "adapter_model.safetensors"))
    final = adapter(run)
    assert max_diff({k: v for k, v in saved.items()}, {k: v for k, v in final.items()}) == 0.0
    # a rerun finds the decision in the checkpoint and trains no further
    medgen("train", *TINY, f"run.dir={run}", f"data.shards={tiny_run / 'data'}", "train.max_steps=16",
           "train.warmup_steps=2", "train.batch_size=4", "lora.dropout=0.05", *EARLY)
    assert _record(run)["steps"] == stop and max_diff(adapter(run), final) == 0.0


def test_a_preempted_run_with_early_stopping_ends_as_the_uninterrupted_one(tmp_path, tiny_run):
    shards = tiny_run / "data"
    ref = tmp_path / "ref"
    _train(ref, shards, *EARLY)
    run = tmp_path / "run"
    args = ["train", *TINY, f"run.dir={run}", f"data.shards={shards}", "train.max_steps=8", "train.warmup_steps=2",
            "train.batch_size=4", "lora.dropout=0.05", *EARLY]
    proc = subprocess.Popen(command(*args), cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress, deadline = run / "samples" / "rank-00000.jsonl", time.time() + 600
    while not (progress.exists() and len(progress.read_text().splitlines()) >= 3):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-3000:] if proc.poll() else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 75 and "stopped by a signal" in err, err[-3000:]
    medgen(*args)
    assert _record(run)["steps"] == _record(ref)["steps"] and _record(run)["adapter_step"] == _record(ref)["adapter_step"]
    assert max_diff(adapter(run), adapter(ref)) <= 1e-6
    assert (run / "samples" / "rank-00000.jsonl").read_text() == (ref / "samples" / "rank-00000.jsonl").read_text()
