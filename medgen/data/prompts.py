"""The prompts file of the generate stage: JSONL records with ``id`` and ``prompt`` (other fields carried
through), OpenAI batch request lines (medgen/openai_batch.py), or plain text with one prompt per line, from any
fsspec URL. Parsed in full before any model is loaded (and by ``medgen validate`` / ``medgen run`` before the
first stage): a bad line is one error naming the file and line, never a failure after hours of training.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from medgen import openai_batch
from medgen.data.retry import RETRY_SECONDS, retrying
from medgen.data.storage import is_local, local_path, redact, storage_errors, url_to_fs
from medgen.errors import UserError

STDIN = "-"


def check_exists(url: str) -> list[str]:
    """A local prompts file that is not there, as a config problem (an object-store URL is read by ``check``)."""
    if url != STDIN and is_local(url) and not os.path.isfile(local_path(url)):
        return [f"generate.prompts: file not found: {url}"]
    return []


def read_prompts(url: str, storage_options: dict | None = None,
                 retry_seconds: float = RETRY_SECONDS) -> list[dict[str, Any]] | list[openai_batch.Request]:
    """JSONL objects with ``id`` and ``prompt`` (other fields carried through), or one prompt per text line; for
    an OpenAI batch file, its requests (see ``parse_prompts``)."""
    fs, path = url_to_fs("generate.prompts", url, storage_options or {})

    def read() -> bytes:
        with fs.open(path, "rb", compression="infer") as f:
            return f.read()

    with storage_errors("generate.prompts", url):
        data = retrying(read, "generate.prompts", url, retry_seconds)
    plain = url.removesuffix(".gz").removesuffix(".bz2").removesuffix(".zst").removesuffix(".xz")
    return parse_prompts(decode_prompts(data, redact(url)), redact(url), plain.endswith((".jsonl", ".json")))


def decode_prompts(data: bytes, source: str) -> str:
    """UTF-8 (a byte order mark is dropped), or a UserError naming the line and byte that are not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"generate.prompts {source}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}); save the file as UTF-8") from None


def looks_jsonl(text: str) -> bool:
    """For stdin, which has no file name: JSONL when the first non-blank line is an object with a prompt (or an
    OpenAI batch line)."""
    rec = _first_object(text)
    return isinstance(rec, dict) and ("prompt" in rec or openai_batch.is_batch_line(rec))


def _first_object(text: str) -> Any:
    first = next((ln for ln in _LINE_END.split(text) if ln.strip()), "")
    try:
        return json.loads(first)
    except json.JSONDecodeError:
        return None


def parse_prompts(text: str, source: str, jsonl: bool) -> list[dict[str, Any]] | list[openai_batch.Request]:
    """Prompt records in input order; a text line's id is ``line-<n>`` (its 1-based line number). A JSONL file
    whose first line is an OpenAI batch request line (custom_id, body) is read as one: its requests, each valid
    or carrying the error of its error line (medgen/openai_batch.py)."""
    if jsonl and openai_batch.is_batch_line(_first_object(text)):
        return openai_batch.parse([(n, _json_line(line, source, n)) for n, line in enumerate(_LINE_END.split(text), 1)
                                   if line.strip()], source)
    prompts, seen = [], set()
    # \n, \r\n or \r, not splitlines(): JSON strings may hold U+2028, \x1c etc. unescaped
    for n, line in enumerate(_LINE_END.split(text), 1):
        if not line.strip():
            continue
        rec = _json_prompt(line, source, n) if jsonl else {"id": f"line-{n}", "prompt": line}
        if rec["id"] in seen:
            raise UserError(f"generate.prompts {source}:{n}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        prompts.append(rec)
    return prompts


_LINE_END = re.compile(r"\r\n|\r|\n")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_prompt(line: str, source: str, n: int) -> dict[str, Any]:
    rec = _json_line(line, source, n)
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
        raise UserError(f"generate.prompts {source}:{n}: needs a string field 'prompt'")
    if not rec["prompt"]:
        raise UserError(f"generate.prompts {source}:{n}: empty prompt")
    rec["id"] = str(rec.get("id", f"line-{n}"))
    return rec


def _json_line(line: str, source: str, n: int) -> Any:
    """One JSONL line, parsed; a line that is not usable JSON is a user error naming it."""
    try:
        rec = json.loads(line, parse_constant=_no_constant)
        json.dumps(rec, ensure_ascii=False).encode("utf-8")  # the output must be able to hold it
    except json.JSONDecodeError as e:
        raise UserError(f"generate.prompts {source}:{n}: not valid JSON ({e.msg})") from None
    except UnicodeEncodeError:
        raise UserError(f"generate.prompts {source}:{n}: a \\ud800-\\udfff escape without its pair "
                        f"(not a character)") from None
    except (ValueError, RecursionError) as e:  # NaN/Infinity, a number of 4300+ digits, nesting too deep
        raise UserError(f"generate.prompts {source}:{n}: not usable JSON ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:100]})") from None
    return rec
