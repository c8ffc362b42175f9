"""OpenAI batch files for the generate stage: request lines in (``custom_id``, ``method``, ``url``, ``body``), and,
with ``generate.format=openai-batch``, output lines out (``id``, ``custom_id``, ``response``, ``error``).

The one home of that format: which body field means which medgen setting, the checks that turn a line the format
(or medgen) does not allow into an error line for its custom_id, how a chat is rendered into a prompt, and the
output objects. Every function here depends only on the line, the config and the tokenizer, so every rank and
every rerun resolves a line the same way, and the output file is rebuilt from the part files alone (exactly once
is the part files' business: medgen/generate.py). docs/generate.md ("OpenAI batch files") has the long form.
"""
from __future__ import annotations

import calendar
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from medgen.errors import UserError

if TYPE_CHECKING:  # medgen.data.prompts imports this module while medgen.config may still be loading
    from medgen.config import GenerateConfig

# url -> the response object's "object"
URLS = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat.completion"}
LINE_KEYS = ("custom_id", "method", "url", "body")
ROLES = ("system", "developer", "user", "assistant")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # medgen's finish_reason -> OpenAI's


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _stops(v: Any) -> bool:
    if isinstance(v, str):
        return bool(v)
    return isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) and s for s in v)


# body field -> (its check, what it must be); null means "not given" (OpenAI's own reading of null)
SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _num(v) and 0 <= v <= 2, "a number in [0, 2]"),
    "top_p": (lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
    "n": (lambda v: _int(v) and 1 <= v <= 128, "an integer in [1, 128]"),
    "stop": (_stops, "a non-empty string or a list of at most 4 non-empty strings"),
    "seed": (_int, "an integer"),
    # vLLM's extra sampling parameters (its CompletionRequest / ChatCompletionRequest take them too)
    "top_k": (lambda v: _int(v) and v >= -1, "an integer >= -1 (-1 or 0 = off)"),
    "min_tokens": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "repetition_penalty": (lambda v: _num(v) and v > 0, "a number > 0"),
}
CHAT_ONLY = {"max_completion_tokens": SETTINGS["max_tokens"]}
IGNORED = ("model", "user")  # the run's model generates; user is the caller's own tag
# fields that change nothing at these values: accepted, so that files written for OpenAI need no editing
NEUTRAL = {"stream": (False,), "logprobs": (False,), "echo": (False,), "presence_penalty": (0,),
           "frequency_penalty": (0,), "best_of": (1,), "logit_bias": ({},)}


class LineError(Exception):
    """A line the format or medgen does not allow: one error line for its custom_id, the batch goes on."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Request:
    custom_id: str
    line: int  # 1-based line number in the input
    url: str = ""
    body: dict = field(default_factory=dict)
    error: str = ""  # '' = valid; else the message of its error line
    param: str | None = None  # the field at fault, for the error line
    # set by resolve()
    prompt: str = ""
    config: GenerateConfig | None = None
    seed: int = 0

    @property
    def chat(self) -> bool:
        return self.url == "/v1/chat/completions"

    @property
    def n(self) -> int:
        return self.config.num_samples if self.config else 1

    def fail(self, e: LineError) -> None:
        self.error, self.param = str(e), e.param


def is_batch_line(rec: Any) -> bool:
    """An OpenAI batch request line (medgen's own lines have a prompt, not a custom_id and a body)."""
    return isinstance(rec, dict) and "custom_id" in rec and "body" in rec


# --------------------------------------------------------------------------- input


def parse(lines: list[tuple[int, dict]], source: str) -> list[Request]:
    """Requests in input order from (line number, parsed object) pairs. A line without a string custom_id, or
    with one used before, is a user error naming the line (OpenAI rejects such files whole, too); every other
    problem is the line's own error."""
    out, seen = [], {}
    for n, rec in lines:
        cid = rec.get("custom_id") if isinstance(rec, dict) else None
        if not isinstance(cid, str) or not cid:
            raise UserError(f"generate.prompts {source}:{n}: an OpenAI batch line needs a non-empty string 'custom_id'")
        if cid in seen:
            raise UserError(f"generate.prompts {source}:{n}: duplicate custom_id {cid!r} (first on line {seen[cid]})")
        seen[cid] = n
        req = Request(cid, n, url=rec.get("url", ""), body=rec.get("body"))
        try:
            _check_line(rec)
        except LineError as e:
            req.fail(e)
        out.append(req)
    return out


def _check_line(rec: dict) -> None:
    extra = [k for k in rec if k not in LINE_KEYS]
    if extra:
        raise LineError(f"{extra[0]}: not a field of an OpenAI batch line (fields: {', '.join(LINE_KEYS)})", extra[0])
    if rec.get("method") != "POST":
        raise LineError(f"method: must be \"POST\" (got {_show(rec.get('method'))})", "method")
    if rec.get("url") not in URLS:
        raise LineError(f"url: medgen serves {' and '.join(URLS)} (got {_show(rec.get('url'))})", "url")
    body = rec["body"]
    if not isinstance(body, dict):
        raise LineError("body: must be an object", "body")
    chat = rec["url"] == "/v1/chat/completions"
    for k, v in body.items():
        _check_field(k, v, chat)
    if chat:
        if "messages" not in body:
            raise LineError("body.messages: missing (a /v1/chat/completions request needs messages)", "messages")
        if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
            raise LineError("body: give max_completion_tokens or max_tokens, not both", "max_tokens")
    elif "prompt" not in body:
        raise LineError("body.prompt: missing (a /v1/completions request needs a prompt)", "prompt")


def _check_field(k: str, v: Any, chat: bool) -> None:
    checks = {**SETTINGS, **(CHAT_ONLY if chat else {})}
    if k in checks:
        ok, what = checks[k]
        if v is not None and not ok(v):
            raise LineError(f"body.{k}: must be {what} (got {_show(v)})", k)
    elif k == ("messages" if chat else "prompt"):
        _check_messages(v) if chat else _check_prompt(v)
    elif k in NEUTRAL:
        if v is not None and not any(v == x and isinstance(v, bool) == isinstance(x, bool) for x in NEUTRAL[k]):
            raise LineError(f"body.{k}: medgen does not support it (accepted: null or {_show(NEUTRAL[k][0])}; "
                            f"got {_show(v)})", k)
    elif k in IGNORED:
        if v is not None and not isinstance(v, str):
            raise LineError(f"body.{k}: must be a string (got {_show(v)})", k)
    else:
        url = "/v1/chat/completions" if chat else "/v1/completions"
        raise LineError(f"body.{k}: not a field medgen reads for {url}", k)


def _check_prompt(v: Any) -> None:
    if isinstance(v, list):
        raise LineError("body.prompt: one string per request (a list of prompts or of token ids is not supported: "
                        "give each prompt its own custom_id)", "prompt")
    if not isinstance(v, str) or not v:
        raise LineError(f"body.prompt: must be a non-empty string (got {_show(v)})", "prompt")


def _check_messages(v: Any) -> None:
    if not isinstance(v, list) or not v:
        raise LineError("body.messages: must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(v):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise LineError(f"{where}.role: must be one of {', '.join(ROLES)}", "messages")
        extra = [k for k in m if k not in ("role", "content", "name")]
        if extra:
            raise LineError(f"{where}.{extra[0]}: not supported (medgen reads role and content)", "messages")
        _text(m.get("content"), where)


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts joined (OpenAI's two forms); anything else is an error."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else None
    if parts is not None and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                 for p in parts):
        return "".join(p["text"] for p in parts)
    raise LineError(f"{where}.content: must be a string or a list of text parts (images, audio etc. are not "
                    "supported)", "messages")


def _show(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def render_chat(messages: list[dict], tok) -> str:
    """The prompt text of a chat: the tokenizer's chat template with the assistant's turn opened, where it has one;
    else (GPT-2 has none) one ``role: content`` line per message and ``assistant:`` to be continued."""
    msgs = [{"role": m["role"], "content": _text(m.get("content"), "")} for m in messages]
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def resolve(requests: list[Request], g: GenerateConfig, tok, max_positions: int) -> None:
    """Each valid request's prompt text, decoding settings (a GenerateConfig: the body's fields over
    generate.*) and seed; a request medgen cannot serve gets its error instead."""
    for r in requests:
        if r.error:
            continue
        try:
            r.config, r.seed = _settings(r, g), r.body.get("seed") if r.body.get("seed") is not None else g.seed
            r.prompt = render_chat(r.body["messages"], tok) if r.chat else r.body["prompt"]
            _check_length(r, tok, max_positions)
        except LineError as e:
            r.fail(e)
            r.config = None


def _settings(r: Request, g: GenerateConfig) -> GenerateConfig:
    b = {k: v for k, v in r.body.items() if v is not None}
    over: dict[str, Any] = {}
    if "max_tokens" in b or "max_completion_tokens" in b:
        over["max_new_tokens"] = b.get("max_completion_tokens", b.get("max_tokens"))
    if "min_tokens" in b:
        over["min_new_tokens"] = b["min_tokens"]
    if "temperature" in b:  # 0 = greedy, as OpenAI reads it
        over["do_sample"] = b["temperature"] > 0
        if b["temperature"] > 0:
            over["temperature"] = b["temperature"]
    for k, name in (("top_p", "top_p"), ("repetition_penalty", "repetition_penalty"), ("n", "num_samples")):
        if k in b:
            over[name] = b[k]
    if "top_k" in b:
        over["top_k"] = max(b["top_k"], 0)
    if "stop" in b:
        over["stop"] = [b["stop"]] if isinstance(b["stop"], str) else list(b["stop"])
    c = dataclasses.replace(g, **over)
    if c.min_new_tokens > c.max_new_tokens:
        raise LineError(f"body.min_tokens: {c.min_new_tokens} is more than max_tokens {c.max_new_tokens}", "min_tokens")
    if c.num_samples > 1 and not c.do_sample:
        raise LineError("body.n: n > 1 needs sampling (temperature > 0, or generate.do_sample=true when the line "
                        "gives no temperature): greedy completions would all be the same", "n")
    return c


def _check_length(r: Request, tok, max_positions: int) -> None:
    n = len(tok(r.prompt, add_special_tokens=False)["input_ids"])
    if not n:
        raise LineError("the prompt is empty after tokenization", "messages" if r.chat else "prompt")
    new = r.config.max_new_tokens
    if max_positions and n + new > max_positions:
        raise LineError(f"the prompt has {n} tokens; with max_tokens {new} that is more than the model's "
                        f"{max_positions} positions", "max_tokens")


def items(requests: list[Request], gen_params: Callable[[GenerateConfig], dict]) -> list[dict[str, Any]]:
    """Work items of the valid requests, one per (custom_id, sample), carrying their own params and seed."""
    return [{"id": r.custom_id, "prompt": r.prompt, "params": gen_params(r.config), "seed": r.seed, "sample": s}
            for r in requests if not r.error for s in range(r.n)]


def first_error(requests: list[Request], source: str) -> str:
    """For medgen's own output format, which has no error lines: the first invalid line as a user error."""
    r = next((r for r in requests if r.error), None)
    return (f"generate.prompts {source}:{r.line}: custom_id {r.custom_id!r}: {r.error} (with generate.format="
            "openai-batch such a line gets an error line in the output instead)") if r else ""


# --------------------------------------------------------------------------- output


def _ids(custom_id: str, header: dict[str, Any]) -> str:
    """Stable ids (a rerun that resumes writes the same line): from the custom_id and the model's fingerprints."""
    key = f"{custom_id}\0{header['model_fingerprint']}\0{header['adapter_fingerprint']}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _unix(iso: str) -> int:
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


def output_line(r: Request, records: list[dict[str, Any]], header: dict[str, Any]) -> dict[str, Any]:
    """The output line of a request: its records (one per sample, medgen's own schema) as a completions or
    chat completions object, with medgen's provenance in the body's metadata; or its error line."""
    h = _ids(r.custom_id, header)
    if r.error:
        err = {"message": r.error, "type": "invalid_request_error", "param": r.param, "code": None}
        return {"id": f"batch_req_{h}", "custom_id": r.custom_id,
                "response": {"status_code": 400, "request_id": f"req_{h}", "body": {"error": err}},
                "error": {"code": "invalid_request", "message": r.error}}
    choices = []
    for s, rec in enumerate(records):
        out = ({"message": {"role": "assistant", "content": rec["completion"]}} if r.chat
               else {"text": rec["completion"]})
        choices.append({"index": s, **out, "logprobs": None, "finish_reason": FINISH[rec["finish_reason"]]})
    first = records[0]
    used = sum(rec["completion_tokens"] for rec in records)
    body = {
        "id": f"{'chatcmpl' if r.chat else 'cmpl'}-{h}", "object": URLS[r.url],
        # when the first of its completions was written (from the part file): the same on every rerun
        "created": min(_unix(rec["created"]) for rec in records), "model": first["model"], "choices": choices,
        "usage": {"prompt_tokens": first["prompt_tokens"], "completion_tokens": used,
                  "total_tokens": first["prompt_tokens"] + used},
        "metadata": {**{k: first[k] for k in ("model_fingerprint", "adapter_fingerprint", "params", "seed", "prompt")},
                     "finish_reasons": [rec["finish_reason"] for rec in records]},
    }
    return {"id": f"batch_req_{h}", "custom_id": r.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{h}", "body": body}, "error": None}


def output_text(requests: list[Request], done: dict[tuple[str, int], str], header: dict[str, Any]) -> str:
    """The whole output file: one line per request, in input order."""
    lines = []
    for r in requests:
        recs = [] if r.error else [json.loads(done[(r.custom_id, s)]) for s in range(r.n)]
        lines.append(json.dumps(output_line(r, recs, header), ensure_ascii=False) + "\n")
    return "".join(lines)
