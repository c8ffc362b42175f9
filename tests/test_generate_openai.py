"""generate with OpenAI batch files: request lines in (each with its own settings), batch output lines out
(generate.format=openai-batch), error lines for lines medgen cannot serve, exactly once under kill -9.

The input files are written as for OpenAI's batch API and checked against the field names of vLLM's
`run-batch` input (``BatchRequestInput`` in vllm/entrypoints/openai/run_batch.py: custom_id, method, url, body;
the body validated by url) without installing vLLM. Real CLI runs (tests/helpers.py) with the tiny random GPT-2
and the adapter that `tiny_run` trained; the parsing and per-line settings tests load no adapter.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from medgen import config, generate, openai_batch
from medgen.data import prompts
from medgen.errors import UserError
from tests.helpers import ROOT, medgen
from tests.test_generate import SCHEMA, _start_and_kill, make_prompts

# vLLM's BatchRequestInput: these four fields, all required (pydantic, no defaults); run-batch serves
# generation for /v1/chat/completions only (its other urls are embeddings, score, rerank).
VLLM_FIELDS = {"custom_id": str, "method": str, "url": str, "body": dict}
VLLM_GENERATION_URLS = {"/v1/chat/completions"}
OPENAI_URLS = {"/v1/completions", "/v1/chat/completions"}


def vllm_problems(line: dict) -> list[str]:
    """Why vLLM's run-batch would refuse this line (structure only): [] = it takes it."""
    p = [f"{k}: missing or not {t.__name__}" for k, t in VLLM_FIELDS.items() if not isinstance(line.get(k), t)]
    p += [f"{k}: not a field of BatchRequestInput" for k in line if k not in VLLM_FIELDS]
    if line.get("url") not in VLLM_GENERATION_URLS:
        p.append(f"url {line.get('url')}: run-batch generates for {VLLM_GENERATION_URLS} only")
    msgs = (line.get("body") or {}).get("messages")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m
                                             for m in msgs):
        p.append("body.messages: ChatCompletionRequest needs a list of {role, content}")
    return p


def openai_problems(line: dict) -> list[str]:
    """OpenAI's batch input line: custom_id (string), method POST, url of a supported endpoint, body object."""
    p = [] if isinstance(line.get("custom_id"), str) and line["custom_id"] else ["custom_id"]
    p += [] if line.get("method") == "POST" else ["method"]
    p += [] if line.get("url") in OPENAI_URLS else ["url"]
    p += [] if isinstance(line.get("body"), dict) else ["body"]
    return p + [k for k in line if k not in VLLM_FIELDS]


def completion(cid: str, prompt: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": "gpt-3.5-turbo-instruct", "prompt": prompt, **body}}


def chat(cid: str, messages: list[dict], **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": messages, **body}}


PROMPTS = [p["prompt"] for p in make_prompts(12)]
CHAT = [{"role": "system", "content": "You write short posts."}, {"role": "user", "content": [
    {"type": "text", "text": "Three habits of good "}, {"type": "text", "text": "code reviewers"}]}]


def mixed_lines() -> list[dict]:
    """Greedy and sampled lines with their own settings (max_tokens, temperature, top_p, n, seed, stop as a string
    and as a list), a chat, a line that takes generate.* as it is, and one line the format does not allow."""
    return [
        completion("greedy-1", PROMPTS[3], max_tokens=8, temperature=0),
        completion("sampled", PROMPTS[5], max_tokens=6, temperature=0.9, top_p=0.9, n=2, seed=7),
        chat("chat-1", CHAT, max_completion_tokens=8, temperature=0),
        completion("bad-field", PROMPTS[1], max_tokens=8, logprobs=5),
        completion("defaults", PROMPTS[7]),  # generate.*: greedy, max_new_tokens=8 (set on the command line)
        completion("stop-str", PROMPTS[9], max_tokens=12, temperature=0, stop=" "),
        completion("stop-list", PROMPTS[9], max_tokens=12, temperature=0, stop=["zzzz", "qqqq"], seed=3),
        completion("greedy-2", PROMPTS[11], max_tokens=4, temperature=0.0, top_p=1),
    ]


def write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def read_lines(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(x) for x in text.splitlines()]


def gen(run_dir: Path, prompts_file: Path, *overrides: str) -> None:
    medgen("generate", "--config", "configs/tiny.yaml", f"run.dir={run_dir}", f"generate.prompts={prompts_file}",
           "generate.max_new_tokens=8", "generate.judge_prompts=0", *overrides, "--quiet")


@pytest.fixture
def run_dir(tmp_path, tiny_run) -> Path:
    d = tmp_path / "run"
    shutil.copytree(tiny_run / "adapter", d / "adapter")
    return d


# --------------------------------------------------------------------------- input lines (no model)


def test_batch_lines_parse_and_each_bad_line_is_its_own_error(tmp_path):
    good = mixed_lines()
    bad = [
        {**completion("wrong-url", "x"), "url": "/v1/embeddings"},
        {**completion("wrong-method", "x"), "method": "GET"},
        {**completion("extra", "x"), "header": {}},
        completion("list-prompt", ["a", "b"]),
        completion("hot", "x", temperature=3),
        completion("five-stops", "x", stop=["a", "b", "c", "d", "e"]),
        completion("empty-stop", "x", stop=""),
        completion("unknown", "x", suffix_magic=1),
        chat("no-messages", CHAT) | {"body": {"model": "m"}},
        chat("image", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        chat("both-max", CHAT, max_tokens=3, max_completion_tokens=4),
        completion("bool-seed", "x", seed=True),
    ]
    for line in good:
        assert not openai_problems(line), line
    reqs = prompts.read_prompts(str(write_lines(tmp_path / "b.jsonl", good + bad)))
    assert [r.custom_id for r in reqs] == [x["custom_id"] for x in good + bad]
    errors = {r.custom_id: r.error for r in reqs if r.error}
    assert set(errors) == {"bad-field"} | {x["custom_id"] for x in bad}
    for cid, needle in (("bad-field", "body.logprobs: medgen does not support it"), ("wrong-url", "url: medgen serves"),
                        ("wrong-method", 'method: must be "POST" (got "GET")'), ("extra", "header: not a field"),
                        ("list-prompt", "one string per request"),
                        ("hot", "body.temperature: must be a number in [0, 2]"),
                        ("five-stops", "body.stop"), ("empty-stop", "body.stop"),
                        ("unknown", "body.suffix_magic: not a field medgen reads for /v1/completions"),
                        ("no-messages", "body.messages: missing"), ("image", "list of text parts"),
                        ("both-max", "not both"), ("bool-seed", "body.seed: must be an integer")):
        assert needle in errors[cid], (cid, errors[cid])
    # what OpenAI rejects whole, medgen rejects whole: one line naming the line
    dup = good[:2] + [completion("greedy-1", "again")]
    with pytest.raises(UserError, match=r"b2.jsonl:3: duplicate custom_id 'greedy-1' \(first on line 1\)"):
        prompts.read_prompts(str(write_lines(tmp_path / "b2.jsonl", dup)))
    (tmp_path / "b3.jsonl").write_text(json.dumps(good[0]) + '\n{"custom_id": "x", "body": {\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"b3.jsonl:2: not valid JSON"):
        prompts.read_prompts(str(tmp_path / "b3.jsonl"))
    with pytest.raises(UserError, match=r"b4.jsonl:2: an OpenAI batch line needs a non-empty string 'custom_id'"):
        prompts.read_prompts(str(write_lines(tmp_path / "b4.jsonl", [good[0], {"body": {}, "prompt": "x"}])))
    # medgen's own files are read as before; stdin sniffing knows both
    assert prompts.looks_jsonl(json.dumps(good[2])) and prompts.looks_jsonl('{"prompt": "x"}')


def test_medgen_format_refuses_a_batch_file_with_a_bad_line(tmp_path):
    """generate.format=medgen has no error lines: the bad line is a user error before any model is loaded."""
    path = write_lines(tmp_path / "b.jsonl", mixed_lines())
    proc = medgen("generate", "--config", "configs/tiny.yaml", f"run.dir={tmp_path / 'run'}", "model.base_only=true",
                  f"generate.prompts={path}", "--quiet", check=False)
    assert proc.returncode == 2
    assert f"{path}:4: custom_id 'bad-field': body.logprobs" in proc.stderr
    assert "generate.format=openai-batch" in proc.stderr
    assert not (tmp_path / "run" / "generations").exists()


def test_line_settings_map_onto_medgen_settings_and_seeds(tmp_path):
    """A line's seed/temperature/top_p/n/max_tokens give what the same generate.* settings give (same id); its
    samples do not depend on batching; greedy chat renders the documented plain text (GPT-2 has no template)."""
    cfg = config.load_config(str(ROOT / "configs/tiny.yaml"), [f"run.dir={tmp_path}", "model.base_only=true",
                                                               "generate.max_new_tokens=8"])
    reqs = prompts.read_prompts(str(write_lines(tmp_path / "b.jsonl", mixed_lines())))
    cfg.generate.format = "openai-batch"  # the file has an error line, which medgen's own format refuses
    items = generate.batch_items(cfg, reqs, "b.jsonl")
    by_id = {r.custom_id: r for r in reqs}
    assert by_id["chat-1"].prompt == ("system: You write short posts.\nuser: Three habits of good code reviewers\n"
                                      "assistant:")
    assert by_id["stop-str"].config.stop == [" "] and by_id["stop-list"].config.stop == ["zzzz", "qqqq"]
    assert by_id["defaults"].config.max_new_tokens == 8 and not by_id["defaults"].config.do_sample
    assert len(items) == 8  # 7 valid lines, 'sampled' twice
    runs = []
    for bs, order in ((1, items), (8, items[::-1])):
        cfg.generate.batch_size = bs
        g = generate.Generator(cfg, torch.device("cpu"))
        runs.append({generate.key(r): r for b in g.run(order) for r in b})
    assert {k: r["completion"] for k, r in runs[0].items()} == {k: r["completion"] for k, r in runs[1].items()}
    got = runs[0]
    assert got[("sampled", 0)]["completion"] != got[("sampled", 1)]["completion"]
    assert got[("sampled", 0)]["params"]["temperature"] == 0.9 and got[("sampled", 0)]["seed"] == 7
    assert got[("greedy-2", 0)]["completion_tokens"] <= 4 and got[("stop-str", 0)]["finish_reason"] == "stop"
    # the same prompt under the same generate.* settings, same id: the same samples
    same = config.load_config(str(ROOT / "configs/tiny.yaml"), [
        f"run.dir={tmp_path}", "model.base_only=true", "generate.max_new_tokens=6", "generate.do_sample=true",
        "generate.temperature=0.9", "generate.top_p=0.9", "generate.num_samples=2", "generate.seed=7"])
    mine = generate.expand([{"id": "sampled", "prompt": PROMPTS[5]}], 2)
    ref = {generate.key(r): r for b in generate.Generator(same, torch.device("cpu")).run(mine) for r in b}
    assert [ref[("sampled", s)]["completion"] for s in (0, 1)] == [got[("sampled", s)]["completion"] for s in (0, 1)]
    assert ref[("sampled", 0)]["params"] == got[("sampled", 0)]["params"]


# --------------------------------------------------------------------------- acceptance, real CLI runs


def test_batch_output_round_trips_and_greedy_equals_medgen_format(tmp_path, run_dir):
    lines = mixed_lines()
    batch_in = write_lines(tmp_path / "batch.jsonl", lines)
    gen(run_dir, batch_in, "generate.format=openai-batch")
    out = read_lines(run_dir / "generations" / "batch_output.jsonl")
    # one line per custom_id, in input order; the bad one an error line, the batch went on
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]
    by_id = {o["custom_id"]: o for o in out}
    bad = by_id.pop("bad-field")
    assert bad["response"]["status_code"] == 400 and "body.logprobs" in bad["error"]["message"]
    assert bad["response"]["body"]["error"]["param"] == "logprobs"
    adapter = json.loads((run_dir / "generations" / "job.json").read_text())["adapter_fingerprint"]
    assert adapter.startswith("sha256:")
    for line in lines:  # round trip: every answer matches its request
        if line["custom_id"] == "bad-field":
            continue
        o, body = by_id[line["custom_id"]], by_id[line["custom_id"]]["response"]["body"]
        assert o["error"] is None and o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
        chat_line = line["url"] == "/v1/chat/completions"
        assert body["object"] == ("chat.completion" if chat_line else "text_completion")
        assert body["model"] == "tiny-gpt2" and isinstance(body["created"], int)
        n = line["body"].get("n", 1)
        assert [c["index"] for c in body["choices"]] == list(range(n))
        assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
        texts = [c["message"]["content"] if chat_line else c["text"] for c in body["choices"]]
        if chat_line:
            assert all(c["message"]["role"] == "assistant" for c in body["choices"])
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= \
            n * line["body"].get("max_tokens", line["body"].get("max_completion_tokens", 8))
        meta = body["metadata"]
        assert meta["adapter_fingerprint"] == adapter and meta["model_fingerprint"].startswith("sha256:")
        assert meta["seed"] == line["body"].get("seed", 0) and meta["params"]["num_samples"] == n
        for t in texts:
            stop = line["body"].get("stop", [])
            for s in [stop] if isinstance(stop, str) else stop:
                assert s not in t
    assert len({c["text"] for c in by_id["sampled"]["response"]["body"]["choices"]}) == 2
    # medgen's own records of the same run: the valid lines, schema-valid, each line's settings in its params
    records = read_lines(run_dir / "generations" / "generations.jsonl")
    for r in records:
        jsonschema.validate(r, SCHEMA)
    assert [(r["id"], r["sample"]) for r in records] == [
        (x["custom_id"], s) for x in lines if x["custom_id"] != "bad-field" for s in range(x["body"].get("n", 1))]
    # greedy lines == medgen's own format for the same prompts (max_new_tokens 8 = theirs)
    greedy = {"greedy-1": PROMPTS[3], "chat-1": by_id["chat-1"]["response"]["body"]["metadata"]["prompt"],
              "defaults": PROMPTS[7]}
    own_dir = tmp_path / "own"
    shutil.copytree(run_dir / "adapter", own_dir / "adapter")
    gen(own_dir, write_lines(tmp_path / "own.jsonl", [{"id": k, "prompt": p} for k, p in greedy.items()]))
    own = {r["id"]: r for r in read_lines(own_dir / "generations" / "generations.jsonl")}
    for cid in greedy:
        choice = by_id[cid]["response"]["body"]["choices"][0]
        assert (choice["message"]["content"] if cid == "chat-1" else choice["text"]) == own[cid]["completion"]
        assert by_id[cid]["response"]["body"]["usage"]["completion_tokens"] == own[cid]["completion_tokens"]
        assert choice["finish_reason"] == openai_batch.FINISH[own[cid]["finish_reason"]]
    assert len({own[c]["completion"] for c in greedy}) == 3


def test_chat_only_file_is_vllm_shaped_and_round_trips_via_stdin(tmp_path, run_dir):
    """A file of chat lines, as vLLM's run-batch takes them, through stdin (no files written)."""
    lines = [chat(f"c{i}", [{"role": "user", "content": p}], max_tokens=5, temperature=0)
             for i, p in enumerate(PROMPTS[:4])]
    for line in lines:
        assert not vllm_problems(line) and not openai_problems(line), line
    assert vllm_problems(completion("x", "y")), "the check must be able to fail"
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "medgen", "generate", "--config", "configs/tiny.yaml",
                           f"run.dir={run_dir}", "generate.prompts=-", "generate.format=openai-batch", "--quiet"],
                          input="".join(json.dumps(x) + "\n" for x in lines), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]
    bodies = [o["response"]["body"] for o in out]
    assert all(b["object"] == "chat.completion" and b["usage"]["completion_tokens"] <= 5 for b in bodies)
    assert not (run_dir / "generations").exists()


def test_kill_and_rerun_every_custom_id_exactly_once(tmp_path, run_dir):
    lines = []
    for i in range(120):  # mixed settings: greedy at two lengths, sampled with n=2 and a seed, stop strings
        kind = i % 4
        body = ({"max_tokens": 6, "temperature": 0} if kind == 0 else {"max_tokens": 4} if kind == 1 else
                {"max_tokens": 5, "temperature": 0.8, "n": 2, "seed": i} if kind == 2 else
                {"max_tokens": 6, "temperature": 0, "stop": [" the"]})
        lines.append(completion(f"r{i:03d}", " ".join(PROMPTS[i % 12].split()[: 1 + i % 5]), **body))
    lines[57] = {**lines[57], "url": "/v1/embeddings"}  # an error line among them
    batch_in = write_lines(tmp_path / "batch.jsonl", lines)
    gen_dir = run_dir / "generations"
    args = ["generate", "--config", "configs/tiny.yaml", f"run.dir={run_dir}", f"generate.prompts={batch_in}",
            "generate.format=openai-batch", "generate.batch_size=2", "generate.judge_prompts=0", "--quiet"]
    _start_and_kill([sys.executable, "-m", "medgen", *args], gen_dir, 1, {})
    assert not (gen_dir / "batch_output.jsonl").exists() and not (gen_dir / "generations.jsonl").exists()
    items = sum(x["body"].get("n", 1) for x in lines) - 1  # r057 has no item
    assert 1 <= sum(p.read_bytes().count(b"\n") for p in gen_dir.glob("part-*.jsonl")) < items, "killed mid-run"
    with open(gen_dir / "part-00000-of-00001.jsonl", "ab") as f:
        f.write(b'{"id": "r119", "sample": 0, "prompt": "tor')  # torn, as if killed mid-write
    medgen(*args)
    out = read_lines(gen_dir / "batch_output.jsonl")
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]
    assert [o["custom_id"] for o in out if o["error"]] == ["r057"]
    assert all(len(o["response"]["body"]["choices"]) == (2 if int(o["custom_id"][1:]) % 4 == 2 else 1)
               for o in out if not o["error"])
    keys = [k for p in gen_dir.glob("part-*.jsonl") for k, _ in generate._parse_part(p.read_bytes())[0]]
    want = [(x["custom_id"], s) for x in lines if x["custom_id"] != "r057" for s in range(x["body"].get("n", 1))]
    assert sorted(keys) == sorted(want), "every (custom_id, sample) completed exactly once across kill and rerun"
    # a rerun with nothing left to do writes the same file: ids and created come from the part files
    before = (gen_dir / "batch_output.jsonl").read_bytes()
    medgen(*args)
    assert (gen_dir / "batch_output.jsonl").read_bytes() == before
    # a line whose own settings changed is refused, as a changed prompt is
    lines[0]["body"]["max_tokens"] = 7
    proc = medgen(*args[:4], f"generate.prompts={write_lines(tmp_path / 'b2.jsonl', lines)}", *args[5:], check=False)
    assert proc.returncode == 2 and "the settings (params) of 'r000' changed" in proc.stderr
