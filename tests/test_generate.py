"""generate: batch/rank-independent decoding, exactly-once output under kill -9, provenance schema, stdin modes.

Real subprocesses (and torchrun, gloo) for the acceptance properties; the tiny random GPT-2 with the
adapter that `tiny_run` trained, so every test takes seconds.
"""
from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import psutil
import pytest
import torch

from medgen import config, generate
from medgen.data import prompts
from medgen.errors import ConfigError, UserError
from tests.helpers import ROOT, medgen

SCHEMA = json.loads(generate.SCHEMA.read_text())
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
WORDS = ("Most beginner Python tutorials skip one habit that would save you hours of debugging later: reading the "
         "error message slowly, from the bottom up, before you touch the code. Last winter I decided to finally "
         "learn how to bake bread, and the first three loaves were bricks.").split()


def make_prompts(n: int) -> list[dict]:
    """n prompts of 1 to 23 words (varied lengths, so batches need padding), with an extra field to carry."""
    return [{"id": f"q{i:03d}", "prompt": " ".join(WORDS[i % 11: i % 11 + 1 + (i * 7) % 23]), "topic": f"t{i % 3}"}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def run_dir(tmp_path, tiny_run) -> Path:
    """A fresh run directory holding the adapter that tiny_run trained."""
    d = tmp_path / "run"
    shutil.copytree(tiny_run / "adapter", d / "adapter")
    return d


def tiny_cfg(run_dir: Path, *overrides: str) -> config.Config:
    return config.load_config(str(ROOT / "configs/tiny.yaml"), [f"run.dir={run_dir}", *overrides])


def gen_args(run_dir: Path, prompts: Path, *overrides: str) -> list[str]:
    # overrides before options: argparse takes no positionals after an option
    return ["generate", "--config", "configs/tiny.yaml", f"run.dir={run_dir}", f"generate.prompts={prompts}",
            *overrides, "--quiet"]


def torchrun(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "medgen", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600, **kw)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def read_final(run_dir: Path) -> list[dict]:
    lines = (run_dir / "generations" / "generations.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", "the file must end with a newline"
    return [json.loads(line) for line in lines[:-1]]


def by_key(records: list[dict]) -> dict:
    return {(r["id"], r["sample"]): (r["completion"], r["completion_tokens"], r["finish_reason"]) for r in records}


def validate(records: list[dict]) -> None:
    for r in records:
        jsonschema.validate(r, SCHEMA)


# --------------------------------------------------------------------------- prompts and config (no model)


def test_prompt_files_jsonl_and_text(tmp_path):
    rows = [{"id": 7, "prompt": "A\u2028B", "tag": "x"}, {"prompt": "no id here"}]
    got = prompts.read_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert got == [{"id": "7", "prompt": "A\u2028B", "tag": "x"}, {"id": "line-2", "prompt": "no id here"}]
    (tmp_path / "p.txt").write_text("first\r\n\n  \nsecond line\n", encoding="utf-8")
    assert prompts.read_prompts(str(tmp_path / "p.txt")) == [
        {"id": "line-1", "prompt": "first"}, {"id": "line-4", "prompt": "second line"}]
    assert prompts.looks_jsonl('\n{"prompt": "x"}\n') and not prompts.looks_jsonl("{curly} text\n")
    for text, msg in (('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}', "duplicate id 'a'"),
                      ('{"prompt": 3}', "needs a string field 'prompt'"), ("{oops", "not valid JSON"),
                      ('{"prompt": ""}', "empty prompt")):
        with pytest.raises(UserError, match=msg):
            prompts.parse_prompts(text, "p.jsonl", True)
    with pytest.raises(UserError, match="not found"):
        prompts.read_prompts(str(tmp_path / "missing.jsonl"))


def test_generate_config_checks():
    with pytest.raises(ConfigError) as e:
        config.load_config(None, ["generate.num_samples=3", "generate.top_p=0", "generate.min_new_tokens=99",
                                  "generate.stop=['']", "generate.dtype=float16"])
    text = "\n".join(e.value.problems)
    for needle in ("num_samples: > 1 needs generate.do_sample", "top_p: must be in (0, 1]",
                   "min_new_tokens: must be in [0, generate.max_new_tokens]", "stop strings must not be empty",
                   "dtype: must be one of float32, bfloat16"):
        assert needle in text
    assert config.load_config(None, ["generate.prompts=-"]).generate.prompts == "-"


# --------------------------------------------------------------------------- decoding, in process


def test_merged_adapter_matches_unmerged_logits(run_dir):
    """The adapter is merged for speed; in fp32 that changes logits by < 1e-5 (on a padded batch, too)."""
    from peft import PeftModel

    from medgen import models

    gen = generate.Generator(tiny_cfg(run_dir), torch.device("cpu"))
    assert gen.adapter_merged and gen.merge_diff < 1e-5 and gen.header["adapter_fingerprint"].startswith("sha256:")
    unmerged = PeftModel.from_pretrained(models.load_model("tiny-gpt2"), str(run_dir / "adapter")).eval()
    enc = gen.tok([p["prompt"] for p in make_prompts(6)], return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (gen.model(**enc).logits - unmerged(**enc).logits)[enc["attention_mask"].bool()].abs().max().item()
    assert diff < 1e-5
    with torch.no_grad(), unmerged.disable_adapter():  # ... and the adapter does change them
        assert (gen.model(**enc).logits - unmerged(**enc).logits).abs().max().item() > 1e-4


def test_sampling_reproducible_and_independent_of_batching(run_dir):
    cfg = tiny_cfg(run_dir, "generate.do_sample=true", "generate.num_samples=3", "generate.max_new_tokens=6",
                   "generate.repetition_penalty=1.2")
    items = generate.expand(make_prompts(4), 3)
    runs = []
    for bs, order in ((1, items), (8, items), (5, items[::-1])):
        cfg.generate.batch_size = bs
        gen = generate.Generator(cfg, torch.device("cpu"))
        runs.append(by_key([r for batch in gen.run(order) for r in batch]))
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == 12
    samples = [runs[0][("q003", s)][0] for s in range(3)]
    assert len(set(samples)) == 3, "samples of one prompt must differ"
    cfg.generate.seed = 1
    other = by_key([r for b in generate.Generator(cfg, torch.device("cpu")).run(items) for r in b])
    assert sum(other[k] != runs[0][k] for k in other) > 9, "another seed must give other samples"


def test_stop_strings_and_min_new_tokens(run_dir):
    items = generate.expand(make_prompts(6), 1)
    gen = generate.Generator(tiny_cfg(run_dir, "generate.max_new_tokens=16"), torch.device("cpu"))
    free = {r["id"]: r for b in gen.run(items) for r in b}
    # a stop string that one completion contains, first after its start: "l P" in " Penal Penal ..."
    rid, cut, stop = next((k, i, r["completion"][i:i + 3]) for k, r in free.items()
                          for i in range(1, len(r["completion"]) - 3)
                          if r["completion"].find(r["completion"][i:i + 3]) == i and r["completion"][i:i + 3].strip())
    text = free[rid]["completion"]
    gen = generate.Generator(tiny_cfg(run_dir, "generate.max_new_tokens=16", f"generate.stop=[{json.dumps(stop)}, 'zzzz']"),
                             torch.device("cpu"))
    stopped = {r["id"]: r for b in gen.run(items) for r in b}
    validate(list(stopped.values()))
    r = stopped[rid]
    assert r["finish_reason"] == "stop" and r["completion"] == text[:cut]
    assert r["completion_tokens"] < free[rid]["completion_tokens"]
    assert r["params"]["stop"] == [stop, "zzzz"]
    for k, rec in stopped.items():  # the others: unchanged where the stop string never shows up
        if stop not in free[k]["completion"]:
            assert rec["completion"] == free[k]["completion"] and rec["finish_reason"] == free[k]["finish_reason"]
        assert stop not in rec["completion"]
    gen = generate.Generator(tiny_cfg(run_dir, "generate.max_new_tokens=6", "generate.min_new_tokens=6"), torch.device("cpu"))
    assert all(r["completion_tokens"] == 6 and r["finish_reason"] == "length" for b in gen.run(items) for r in b)


def test_rerun_skips_done_and_refuses_other_settings(run_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", make_prompts(5))
    cfg = tiny_cfg(run_dir, f"generate.prompts={prompts}", "generate.max_new_tokens=4")
    generate.run(cfg)
    final = run_dir / "generations" / "generations.jsonl"
    before = final.read_bytes()
    part = next((run_dir / "generations").glob("part-*.jsonl")).read_bytes()
    generate.run(cfg)  # nothing left to do: no line written again, same file
    assert final.read_bytes() == before and next((run_dir / "generations").glob("part-*.jsonl")).read_bytes() == part
    with pytest.raises(UserError, match=r"other settings \(params.max_new_tokens\)"):
        generate.run(tiny_cfg(run_dir, f"generate.prompts={prompts}", "generate.max_new_tokens=5"))
    changed = make_prompts(5)
    changed[1]["prompt"] += " (edited)"
    with pytest.raises(UserError, match="prompt 'q001' changed"):
        generate.run(tiny_cfg(run_dir, f"generate.prompts={write_jsonl(tmp_path / 'p2.jsonl', changed)}",
                              "generate.max_new_tokens=4"))


def test_completions_of_an_adapter_the_run_no_longer_has_are_set_aside_and_made_again(run_dir, tmp_path, caplog):
    """Training went on (a larger train.max_steps) and `medgen run` again: generate brings its output up to date,
    keeps the old completions in their own folder, and the base model's completions, whose model did not
    change, are not made again."""
    from safetensors.torch import load_file, save_file

    prompts = write_jsonl(tmp_path / "p.jsonl", make_prompts(3))
    cfg = tiny_cfg(run_dir, f"generate.prompts={prompts}", "generate.max_new_tokens=4", "generate.base_prompts=2")
    generate.run(cfg)
    gen = run_dir / "generations"
    before, base = read_final(run_dir), (gen / "base.jsonl").read_bytes()
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    save_file({k: v * 3 for k, v in load_file(weights).items()}, weights)  # another adapter in its place
    with caplog.at_level("WARNING"):
        generate.run(cfg)
    after = read_final(run_dir)
    old_fp, new_fp = before[0]["adapter_fingerprint"], after[0]["adapter_fingerprint"]
    assert old_fp != new_fp and {r["adapter_fingerprint"] for r in after} == {new_fp}
    aside = gen / f"superseded-{old_fp.removeprefix('sha256:')[:16]}"
    assert [json.loads(x) for x in (aside / "generations.jsonl").read_text().splitlines()] == before
    assert list(aside.glob("part-*.jsonl")) and (aside / "job.json").exists()
    assert f"held completions of adapter {old_fp}; the run's adapter is now {new_fp}" in caplog.text
    assert (gen / "base.jsonl").read_bytes() == base and not list(gen.glob("base-superseded-*"))
    with pytest.raises(UserError, match=r"other settings \(params.max_new_tokens\)"):  # other changes still refused
        generate.run(tiny_cfg(run_dir, f"generate.prompts={prompts}", "generate.max_new_tokens=5",
                              "generate.base_prompts=2"))


# --------------------------------------------------------------------------- acceptance, real subprocesses


def test_greedy_identical_across_batch_sizes_and_processes(tmp_path, tiny_run):
    prompts = write_jsonl(tmp_path / "p.jsonl", make_prompts(24))
    results = []
    for name, bs, launch in (("bs1", 1, medgen), ("bs8", 8, medgen), ("bs8x2", 8, torchrun)):
        d = tmp_path / name
        shutil.copytree(tiny_run / "adapter", d / "adapter")
        launch(*gen_args(d, prompts, f"generate.batch_size={bs}", "generate.max_new_tokens=16",
                         "generate.repetition_penalty=1.3"))
        records = read_final(d)
        validate(records)
        assert [r["id"] for r in records] == [p["id"] for p in make_prompts(24)]
        results.append(by_key(records))
    parts = sorted((tmp_path / "bs8x2" / "generations").glob("part-*"))
    assert [p.name for p in parts] == ["part-00000-of-00002.jsonl", "part-00001-of-00002.jsonl"]
    assert [p.read_text().count("\n") for p in parts] == [12, 12], "each rank does its half"
    assert results[0] == results[1] == results[2]
    assert len({c for c, _, _ in results[0].values()}) > 12, "completions should differ between prompts"


@pytest.mark.slow  # two generations of 2048 prompts
def test_a_batch_that_does_not_fit_in_memory_is_halved_until_one_does_with_the_same_completions(tmp_path):
    """A real allocation failure: generate under an address-space limit (RLIMIT_AS, 3.5 GB) with 2048 long prompts
    in one batch halves the batch until one fits, says so, and writes what batches of 64 write without a limit
    (greedy float32: a completion does not depend on its batch)."""
    rows = [{"id": f"L{i:04d}", "prompt": " ".join(WORDS[i % 11:] + WORDS * 4)} for i in range(2048)]
    prompts = write_jsonl(tmp_path / "long.jsonl", rows)
    common = ("generate.max_new_tokens=4", "model.base_only=true", "generate.base_prompts=0",
              "generate.judge_prompts=0")
    medgen(*gen_args(tmp_path / "free", prompts, "generate.batch_size=64", *common))
    proc = medgen(*gen_args(tmp_path / "limited", prompts, "generate.batch_size=2048", *common),
                  memory_limit=3_500_000_000)
    halved = [ln for ln in proc.stderr.splitlines() if "out of memory" in ln]
    assert halved and "generate: out of memory on cpu with 2048 prompts per batch: 1024 from here on (set " \
        "generate.batch_size=1024 to start there)" in halved[0], proc.stderr[-3000:]
    assert by_key(read_final(tmp_path / "limited")) == by_key(read_final(tmp_path / "free"))


def _part_lines(gen_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in gen_dir.glob("part-*.jsonl"))


def _start_and_kill(cmd: list[str], gen_dir: Path, until_lines: int, env: dict) -> None:
    """Start cmd, SIGKILL it and all its descendants once the part files hold until_lines lines."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while _part_lines(gen_dir) < until_lines:
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    victims = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in victims:  # torchrun starts each worker in its own session: kill them one by one
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in victims[1:]:
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)


def test_kill_and_rerun_every_prompt_exactly_once(tmp_path, run_dir):
    rows = make_prompts(200)
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    gen_dir = run_dir / "generations"
    args = gen_args(run_dir, prompts, "generate.batch_size=2", "generate.max_new_tokens=8")
    # 1. one process, killed as soon as the first lines reach its part file; then a torn line as if mid-write
    _start_and_kill([sys.executable, "-m", "medgen", *args], gen_dir, 1, {})
    assert not (gen_dir / "generations.jsonl").exists()
    with open(gen_dir / "part-00000-of-00001.jsonl", "ab") as f:
        f.write(b'{"id": "q199", "sample": 0, "prompt": "tor')
    # 2. a different world size: two processes, killed half-way; one more torn line
    _start_and_kill([TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "medgen", *args], gen_dir, 100,
                    {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert not (gen_dir / "generations.jsonl").exists()
    assert 100 <= _part_lines(gen_dir) < 200
    assert all((gen_dir / f"part-0000{r}-of-00002.jsonl").stat().st_size > 0 for r in (0, 1)), "both ranks worked"
    with open(gen_dir / "part-00001-of-00002.jsonl", "ab") as f:
        f.write(b'{"id": "q1')
    # 3. one process again, to the end
    medgen(*args)
    records = read_final(run_dir)
    assert [(r["id"], r["sample"]) for r in records] == [(r["id"], 0) for r in rows]
    validate(records)
    assert all(r["topic"] == row["topic"] and r["prompt"] == row["prompt"] for r, row in zip(records, rows))
    # no item was ever finished twice: the parts (torn tails aside) hold each one exactly once
    keys = []
    for part in gen_dir.glob("part-*.jsonl"):
        lines, _ = generate._parse_part(part.read_bytes())
        keys += [k for k, _ in lines]
    assert sorted(keys) == sorted((r["id"], 0) for r in rows)


def test_stdin_jsonl_to_stdout(run_dir):
    rows = make_prompts(5)
    proc = subprocess.run([sys.executable, "-m", "medgen", "generate", "--config", "configs/tiny.yaml", f"run.dir={run_dir}",
                           "generate.prompts=-", "generate.do_sample=true", "generate.num_samples=2", "--quiet"],
                          input="".join(json.dumps(r) + "\n" for r in rows), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    validate(records)
    assert [(r["id"], r["sample"]) for r in records] == [(r["id"], s) for r in rows for s in (0, 1)]
    assert not (run_dir / "generations").exists(), "stdin mode writes no files"


def test_interactive_on_a_terminal(run_dir):
    prompts = ["Three habits of good code reviewers:", "Hello"]
    gen = generate.Generator(tiny_cfg(run_dir, "generate.max_new_tokens=5"), torch.device("cpu"))
    expected = [r["completion"] for p in prompts for b in gen.run([{"id": "x", "prompt": p, "sample": 0}]) for r in b]
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "medgen", "generate", "--config", "configs/tiny.yaml",
                             f"run.dir={run_dir}", "generate.max_new_tokens=5", "--quiet", "--prompt", "-"],
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    os.close(slave)
    os.write(master, ("\n".join(prompts) + "\n\n").encode())  # two prompts, then an empty line ends it
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        os.close(master)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("> ") == 3, err
    assert out == "".join(c + "\n" for c in expected)
    assert not (run_dir / "generations").exists()
