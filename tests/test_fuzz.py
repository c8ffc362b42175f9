"""Malformed input, fuzzed (issue #14): a seeded mutator breaks a valid CSV, prompts file and YAML config.

Every case must end in one of two ways, never a traceback: success (for the CSV, a prepare report whose
counts add up: rows read = rows kept + rows dropped by reason) or a UserError of one line that names the
culprit. Cases run in-process; a few error cases of the main classes also run through the real CLI (exit 2,
one line, no traceback): each start costs seconds.
Each case is generated from its own seed, so a failing id (``csv-nul_bytes-3``) reproduces alone.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from medgen import config, models, prepare
from medgen.data import prompts as prompt_file
from medgen.data import filters
from medgen.errors import ConfigError, UserError
from tests.articles import HEADER, row
from tests.helpers import ROOT, medgen

SEED = 14
BASE_ROWS = 6
TEN_MB = 10 << 20


@dataclass
class Case:
    data: bytes
    note: str  # what the mutation did, for the failure message
    rows: int | None = None  # rows the report must say it read, where the mutation keeps the row structure
    outcome: str = "any"  # "ok", "error" or "any"


def _rng(kind: str, name: str, i: int) -> random.Random:
    return random.Random(f"{SEED}-{kind}-{name}-{i}")


# --------------------------------------------------------------------------------------------- CSV


def base_csv(delimiter: str = ",", header: list[str] = HEADER, rows: int = BASE_ROWS) -> bytes:
    out = io.StringIO()
    w = csv.writer(out, delimiter=delimiter)  # csv's own line ending: \r\n
    w.writerow(header)
    w.writerows(row(i) for i in range(rows))
    return out.getvalue().encode()


def _header_end(data: bytes) -> int:
    return data.index(b"\r\n") + 2


def _letter_positions(data: bytes, start: int) -> list[int]:
    """Offsets between two ASCII letters after ``start``: an insertion there cannot split a row."""
    return [i for i in range(start + 1, len(data)) if data[i - 1:i].isalpha() and data[i:i + 1].isalpha()]


def _insert(data: bytes, positions: list[int], blobs: list[bytes]) -> bytes:
    for pos, blob in sorted(zip(positions, blobs), reverse=True):
        data = data[:pos] + blob + data[pos:]
    return data


def csv_invalid_utf8(rng: random.Random) -> Case:
    data = base_csv()
    bad = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"]
    n = rng.randint(1, 8)
    where = rng.sample(_letter_positions(data, _header_end(data)), n)
    blobs = [rng.choice(bad) for _ in where]
    if rng.random() < 0.2:  # a multi-byte sequence cut by the end of the file
        return Case(data + b"x,\xe2\x82", f"truncated UTF-8 at EOF + {blobs} at {where}", None, "ok")
    return Case(_insert(data, where, blobs), f"invalid UTF-8 {blobs} at {where}", BASE_ROWS, "ok")


def csv_nul_bytes(rng: random.Random) -> Case:
    data = base_csv()
    if rng.random() < 0.25:  # anywhere, the header and line ends included
        where = sorted(rng.sample(range(len(data)), rng.randint(1, 20)))
        return Case(_insert(data, where, [b"\x00"] * len(where)), f"NUL at {where}")
    where = rng.sample(_letter_positions(data, _header_end(data)), rng.randint(1, 30))
    runs = [b"\x00" * rng.choice((1, 1, 2, 100)) for _ in where]
    return Case(_insert(data, where, runs), f"NUL runs {[len(r) for r in runs]} at {where}", BASE_ROWS, "ok")


BOMS = {"utf-8": b"\xef\xbb\xbf", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff",
        "utf-32-le": b"\xff\xfe\x00\x00", "utf-32-be": b"\x00\x00\xfe\xff"}


def csv_bom(rng: random.Random) -> Case:
    data = base_csv()
    kind = rng.choice(["utf-8", "utf-8-twice", "utf-8-in-data", "utf-8-mid-header", *list(BOMS)[1:]])
    if kind == "utf-8":
        return Case(BOMS["utf-8"] + data, kind, BASE_ROWS, "ok")
    if kind == "utf-8-twice":  # the second one is part of the first column's name: no column 'title'
        return Case(BOMS["utf-8"] * 2 + data, kind, None, "error")
    if kind == "utf-8-in-data":
        where = rng.sample(_letter_positions(data, _header_end(data)), rng.randint(1, 5))
        return Case(_insert(data, where, [BOMS["utf-8"]] * len(where)), f"{kind} at {where}", BASE_ROWS, "ok")
    if kind == "utf-8-mid-header":
        pos = rng.randint(1, _header_end(data) - 3)
        return Case(_insert(data, [pos], [BOMS["utf-8"]]), f"{kind} at {pos}", None, "error")
    return Case(BOMS[kind] + data.decode().encode(kind), f"{kind} file with its BOM", None, "error")


def csv_line_endings(rng: random.Random) -> Case:
    text = base_csv().decode()
    lines = text.split("\r\n")
    kind = rng.choice(["lf", "cr", "crlf", "mixed", "lf-no-final"])
    if kind == "mixed":
        ends = [rng.choice(["\n", "\r", "\r\n"]) for _ in lines[:-1]]
        return Case(("".join(ln + e for ln, e in zip(lines, ends))).encode(), f"mixed {ends}", BASE_ROWS, "ok")
    end = {"lf": "\n", "cr": "\r", "crlf": "\r\n", "lf-no-final": "\n"}[kind]
    out = end.join(lines)
    return Case((out.rstrip("\n") if kind == "lf-no-final" else out).encode(), kind, BASE_ROWS, "ok")


def csv_unbalanced_quotes(rng: random.Random) -> Case:
    data = base_csv()
    kind = rng.choice(["insert", "insert", "delete", "open-last-row", "insert-many"])
    if kind == "delete" and b'"' in data:
        quotes = [i for i in range(len(data)) if data[i:i + 1] == b'"']
        pos = rng.choice(quotes)
        return Case(data[:pos] + data[pos + 1:], f"deleted the quote at {pos}")
    if kind == "open-last-row":
        return Case(data + b'Broken,"never closed,u,[],2020-01-01,[]\r\n', kind, None, "error")
    where = sorted(rng.sample(range(len(data)), rng.randint(1, 6 if kind == "insert" else 40)))
    return Case(_insert(data, where, [b'"'] * len(where)), f"quotes inserted at {where}")


def csv_huge_field(rng: random.Random, i: int = 0) -> Case:
    column = HEADER[i % len(HEADER)]  # every column once
    filler = rng.choice(["word ", "x", "a,b ", 'say "hi" ', "\u00e9\u4e2d "])
    value = (filler * (TEN_MB // len(filler.encode()) + 1))
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(HEADER)
    big = row(99, **{column: value})
    rows = [row(i) for i in range(BASE_ROWS)]
    rows.insert(rng.randint(0, BASE_ROWS), big)
    w.writerows(rows)
    return Case(out.getvalue().encode(), f"10 MB {column} of {filler!r}", BASE_ROWS + 1, "ok")


DELIMITERS = [";", "\t", "|", " ", ":"]


def csv_wrong_delimiter(rng: random.Random) -> Case:
    delim = rng.choice(DELIMITERS)
    return Case(base_csv(delimiter=delim), f"delimiter {delim!r}", None, "error")


def csv_header_only(rng: random.Random) -> Case:
    header = ",".join(rng.sample(HEADER, len(HEADER)))
    end = rng.choice(["", "\n", "\r\n", "\r", "\n\n\n", "\r\n\r\n"])
    bom = rng.choice([b"", BOMS["utf-8"]])
    return Case(bom + (header + end).encode(), f"header only, ending {end!r}, bom {bom!r}", 0, "ok")


def csv_duplicate_headers(rng: random.Random) -> Case:
    header = list(HEADER)
    dup = rng.choice(HEADER)
    kind = rng.choice(["replace", "append"])
    if kind == "replace":
        header[rng.choice([i for i, h in enumerate(header) if h != dup])] = dup
        return Case(base_csv(header=header), f"{kind}: {header}", None, "error")
    text = base_csv().decode().split("\r\n")
    text = [text[0] + f",{dup}"] + [ln + ',"other"' if ln else ln for ln in text[1:]]
    return Case("\r\n".join(text).encode(), f"{kind}: a second {dup!r} column", None, "error")


def csv_binary_garbage(rng: random.Random) -> Case:
    data = base_csv()
    kind = rng.choice(["whole", "whole", "chunk", "append", "prefix", "gzip", "truncate", "png"])
    junk = rng.randbytes(rng.choice([1, 7, 100, 4096, 65536]))
    if kind == "whole":
        return Case(junk, f"{len(junk)} random bytes")
    if kind == "chunk":
        pos = rng.randint(_header_end(data), len(data) - 1)
        return Case(data[:pos] + junk + data[pos + len(junk):], f"{len(junk)} random bytes over offset {pos}")
    if kind == "append":
        return Case(data + junk, f"{len(junk)} random bytes appended")
    if kind == "prefix":
        return Case(junk + data, f"{len(junk)} random bytes before the header")
    if kind == "gzip":
        return Case(gzip.compress(data), "gzip-compressed CSV named .csv", None, "error")
    if kind == "png":
        return Case(b"\x89PNG\r\n\x1a\n" + junk, "a PNG named .csv", None, "error")
    cut = rng.randint(1, len(data) - 1)
    return Case(data[:cut], f"truncated at byte {cut}")


def _write_rows(rows: list[list[str]], header: list[str] = HEADER, gaps: dict[int, str] | None = None) -> bytes:
    """The CSV of ``rows``; ``gaps`` puts a raw line before row k (0-based)."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(header)
    for k, r in enumerate(rows):
        if gaps and k in gaps:
            out.write(gaps[k] + "\r\n")
        w.writerow(r)
    return out.getvalue().encode()


def csv_field_count(rng: random.Random) -> Case:
    rows = [row(i) for i in range(BASE_ROWS)]
    kind = rng.choice(["extra", "missing", "blank-lines", "shuffled-header", "whitespace-line"])
    k = rng.randrange(BASE_ROWS)
    if kind == "extra":
        rows[k] += ["EXTRA"] * rng.randint(1, 5)
    elif kind == "missing":
        rows[k] = rows[k][:rng.randint(1, len(HEADER) - 1)]
    elif kind == "blank-lines":
        return Case(_write_rows(rows, gaps={k: "\r\n" * rng.randint(0, 4)}), kind, BASE_ROWS, "ok")
    elif kind == "whitespace-line":
        return Case(_write_rows(rows, gaps={k: " " * rng.randint(1, 5)}), kind, BASE_ROWS + 1, "ok")
    else:
        order = rng.sample(range(len(HEADER)), len(HEADER))
        return Case(base_csv(header=[HEADER[j] for j in order]), f"header order {order}", BASE_ROWS, "ok")
    return Case(_write_rows(rows), f"{kind} fields on row {k}: {len(rows[k])}", BASE_ROWS, "ok")


CSV_MUTATORS: dict[str, tuple[Callable[[random.Random], Case], int]] = {
    "invalid_utf8": (csv_invalid_utf8, 25),
    "nul_bytes": (csv_nul_bytes, 20),
    "bom": (csv_bom, 20),
    "line_endings": (csv_line_endings, 15),
    "unbalanced_quotes": (csv_unbalanced_quotes, 35),
    "huge_field": (csv_huge_field, len(HEADER)),
    "wrong_delimiter": (csv_wrong_delimiter, 10),
    "header_only": (csv_header_only, 12),
    "duplicate_headers": (csv_duplicate_headers, 12),
    "binary_garbage": (csv_binary_garbage, 40),
    "field_count": (csv_field_count, 20),
}


@pytest.fixture(scope="module")
def fast_prepare():
    """prepare.run with the tokenizer and language model loaded once for the module (both are read-only)."""
    tok = models.load_tokenizer("tiny-gpt2")
    lang = filters.LanguageFilter(["en"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_tokenizer", lambda *a, **k: tok)
        mp.setattr(filters, "LanguageFilter", lambda languages: lang)
        yield prepare.run


def assert_one_line(message: str, *culprits: str) -> None:
    assert message and len(message.splitlines()) == 1 and message.isprintable(), repr(message[:3000])
    assert len(message) < 1000, f"{len(message)} chars: {message[:300]}..."
    assert any(c in message for c in culprits), f"names none of {culprits}: {message}"


def check_report(report: dict, case: Case) -> None:
    assert report["rows_read"] == report["rows_kept"] + report["rows_dropped"], report
    assert report["rows_dropped"] == sum(report["dropped"].values()), report
    assert set(report["dropped"]) <= set(prepare.DROP_REASONS), report["dropped"]
    if case.rows is not None:
        assert report["rows_read"] == case.rows, (report, case.note)


def _csv_cases() -> list:
    return [pytest.param(name, i, id=f"csv-{name}-{i}") for name, (_, n) in CSV_MUTATORS.items() for i in range(n)]


@pytest.mark.parametrize("name,i", _csv_cases())
def test_csv_fuzz_prepare_reports_or_fails_in_one_line(tmp_path, fast_prepare, name, i):
    rng = _rng("csv", name, i)
    case = csv_huge_field(rng, i) if name == "huge_field" else CSV_MUTATORS[name][0](rng)
    src = tmp_path / "fuzz.csv"
    src.write_bytes(case.data)
    cfg = config.load_config(str(ROOT / "configs/tiny.yaml"), [f"run.dir={tmp_path}", f"data.source={src}"])
    try:
        report = fast_prepare(cfg)
    except UserError as e:
        assert case.outcome != "ok", f"{case.note}: {e}"
        assert_one_line(str(e), str(src))
        assert not (tmp_path / "data" / "manifest.json").exists()
        return
    assert case.outcome != "error", f"{case.note}: succeeded: {report}"
    check_report(report, case)
    assert json.loads((tmp_path / "data" / "prepare_report.json").read_text())["rows_read"] == report["rows_read"]


# ------------------------------------------------------------------------------------------- prompts


def base_prompts(rng: random.Random, n: int = 5) -> list[dict]:
    return [{"id": f"p{k}", "prompt": f"Prompt number {k} about {rng.choice(['code', 'bread', 'cats'])}"}
            for k in range(n)]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def prompts_case(rng: random.Random) -> tuple[str, Case]:
    """(file suffix, case): one mutation of a valid JSONL or text prompts file."""
    good = base_prompts(rng)
    data = _jsonl(good)
    kind = rng.choice(sorted(PROMPT_MUTATIONS))
    suffix, case = PROMPT_MUTATIONS[kind](rng, data, good)
    return suffix, Case(case.data, f"{kind}: {case.note}", case.rows, case.outcome)


def _line_insert(rng, data: bytes, blob: bytes) -> tuple[bytes, int]:
    pos = rng.choice(_letter_positions(data, 0))
    return data[:pos] + blob + data[pos:], pos


PROMPT_MUTATIONS: dict[str, Callable] = {
    "empty": lambda rng, d, g: (rng.choice([".jsonl", ".txt"]), Case(rng.choice([b"", b"\n\n", b"  \r\n"]), "", 0, "ok")),
    "invalid_utf8": lambda rng, d, g: (rng.choice([".jsonl", ".txt"]),
                                       Case(*_noted(_line_insert(rng, d, rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80"]))),
                                            None, "error")),
    "nul": lambda rng, d, g: (".jsonl", Case(*_noted(_line_insert(rng, d, b"\x00")), None, "error")),
    "nul_text": lambda rng, d, g: (".txt", Case(*_noted(_line_insert(rng, d, b"\x00")), 5, "ok")),
    "huge_line": lambda rng, d, g: (".jsonl", Case(d + _jsonl([{"id": "big", "prompt": "word " * (rng.choice([1, 2]) << 20)}]),
                                                   "a 5-10 MB prompt", 6, "ok")),
    "bom": lambda rng, d, g: (rng.choice([".jsonl", ".txt"]), Case(BOMS["utf-8"] + d, "utf-8 BOM", 5, "ok")),
    "crlf_cr": lambda rng, d, g: (rng.choice([".jsonl", ".txt"]),
                                  Case(d.replace(b"\n", rng.choice([b"\r\n", b"\r"])), "CRLF/CR lines", 5, "ok")),
    "malformed_json": lambda rng, d, g: (".jsonl", Case(*_malformed_json(rng, d), None, "error")),
    "missing_field": lambda rng, d, g: (".jsonl", Case(_jsonl(g[:2] + [rng.choice(
        [{"id": "x"}, {"id": "x", "text": "t"}, {"id": "x", "prompt": None}, {"id": "x", "prompt": 3},
         {"id": "x", "prompt": ""}, {"id": "x", "prompt": ["a"]}])]), "record 3 lacks a string prompt", None, "error")),
    "duplicate_ids": lambda rng, d, g: (".jsonl", Case(_jsonl(g + [dict(rng.choice(g))]), "a repeated record", None, "error")),
    "odd_ids": lambda rng, d, g: (".jsonl", Case(_jsonl([{"id": rng.choice([None, 1.5, [1], {"a": 1}, True, "\n"]),
                                                          "prompt": "x"}]), "id of another type", 1, "ok")),
    "binary": lambda rng, d, g: (rng.choice([".jsonl", ".txt", ".jsonl.gz"]),
                                 Case(rng.randbytes(rng.choice([3, 500, 20000])), "random bytes")),
}


def _noted(pair: tuple[bytes, int]) -> tuple[bytes, str]:
    return pair[0], f"at offset {pair[1]}"


def _malformed_json(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    lines = data.split(b"\n")
    k = rng.randrange(len(lines) - 1)
    bad = rng.choice([lines[k][:-3], lines[k] + b"}", b"[1, 2]", b"42", b'"just a string"', b"{'single': 1}",
                      b"[" * 100000 + b"]" * 100000, b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}",
                      b'{"prompt": "x", "n": NaN}', b'{"prompt": "\\ud800"}', b'{"prompt": "x"} trailing'])
    lines[k] = bad
    return b"\n".join(lines), f"line {k + 1} = {bad[:40]!r}"


def _prompt_cases() -> list:
    return [pytest.param(i, id=f"prompts-{i}") for i in range(60)]


@pytest.mark.parametrize("i", _prompt_cases())
def test_prompts_fuzz_parse_or_fail_in_one_line(tmp_path, i):
    suffix, case = prompts_case(_rng("prompts", "mix", i))
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(case.data)
    try:
        prompts = prompt_file.read_prompts(str(path))
    except UserError as e:
        assert case.outcome != "ok", f"{case.note}: {e}"
        assert_one_line(str(e), str(path))
        return
    assert case.outcome != "error", f"{case.note}: parsed {str(prompts)[:300]}"
    assert all(isinstance(p["id"], str) and isinstance(p["prompt"], str) and p["prompt"] for p in prompts)
    assert len({p["id"] for p in prompts}) == len(prompts)
    if case.rows is not None:
        assert len(prompts) == case.rows, (case.note, prompts[:3])
        assert not any(p["prompt"].startswith("\ufeff") or "\r" in p["prompt"] for p in prompts), prompts


# ---------------------------------------------------------------------------------------------- YAML


TINY_YAML = (ROOT / "configs" / "tiny.yaml").read_text()


def _yaml_syntax(rng: random.Random) -> tuple[str, str]:
    lines = TINY_YAML.splitlines()
    k = rng.randrange(len(lines))
    junk = rng.choice([":", "[", "{", "'", '"', "\t", "- ", "&", "*x", "!!python/object:os.system", "%", "@", "`"])
    lines[k] = lines[k][:len(lines[k]) // 2] + junk + lines[k][len(lines[k]) // 2:]
    return "\n".join(lines), f"{junk!r} into line {k + 1}"


def _yaml_wrong_type(rng: random.Random) -> tuple[str, str]:
    raw = yaml.safe_load(TINY_YAML)
    section = rng.choice(sorted(raw))
    key = rng.choice(sorted(raw[section]))
    raw[section][key] = rng.choice([[1, 2], {"a": 1}, "many", True, None, 3.5, -1, "", [None]])
    return yaml.safe_dump(raw), f"{section}.{key} = {raw[section][key]!r}"


def _yaml_unknown(rng: random.Random) -> tuple[str, str]:
    raw = yaml.safe_load(TINY_YAML)
    where = rng.choice(["top", "section", "weird"])
    if where == "top":
        raw["trian"] = {"max_steps": 1}
    elif where == "section":
        raw[rng.choice(sorted(raw))]["max_stepz"] = 1
    else:
        raw["train"][rng.choice([1, None, "a\nb", "\x1b[31mred", 2.5, True])] = 1
    return yaml.safe_dump(raw), f"unknown key at {where}"


def _yaml_top(rng: random.Random) -> tuple[str, str]:
    text = rng.choice(["- a\n- b\n", "42\n", "just text\n", "null\n", "~\n", "[]\n", "'quoted'\n", "true\n",
                       "train\n", "---\n...\n", "--- 1\n--- 2\n"])
    return text, f"top level {text!r}"


def _yaml_numbers(rng: random.Random) -> tuple[str, str]:
    key = rng.choice(["train.max_steps", "train.learning_rate", "data.val_fraction", "lora.dropout", "eval.context",
                      "generate.temperature", "data.near_dup_threshold", "train.model_dropout", "data.chunk_rows"])
    value = rng.choice(["1" + "0" * 400, "-1" + "0" * 400, "1e400", "-1e400", ".nan", ".inf", "-.inf", "NaN",
                        "0x" + "f" * 100, "1e-400", "9" * 5000])
    section, name = key.split(".")
    return f"{TINY_YAML}\n{section}:\n  {name}: {value}\n", f"{key} = {value[:20]}"


def _yaml_nested(rng: random.Random) -> tuple[str, str]:
    depth = rng.choice([50, 1000, 5000])
    kind = rng.choice(["flow_list", "block_map", "flow_map", "aliases"])
    if kind == "flow_list":
        return f"train:\n  max_steps: {'[' * depth}{']' * depth}\n", f"{kind} {depth}"
    if kind == "block_map":
        return "train:\n" + "".join("  " * (k + 1) + f"k{k}:\n" for k in range(min(depth, 2000))), kind
    if kind == "flow_map":
        return f"train: {'{a: ' * depth}1{'}' * depth}\n", f"{kind} {depth}"
    # a "billion laughs": 10^30 leaves through aliases, to anything that prints the value
    lines = ["x0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"x{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 10)}]" for k in range(1, 31)]
    key = rng.choice(["max_steps", "precision"])
    return "\n".join(lines) + f"\ntrain:\n  {key}: *a30\nlora:\n  target_modules: *a30\n", kind


def _yaml_binary(rng: random.Random) -> tuple[str | bytes, str]:
    kind = rng.choice(["random", "invalid_utf8", "nul", "bom", "utf16"])
    if kind == "random":
        return rng.randbytes(rng.choice([1, 50, 5000])), "random bytes"
    if kind == "invalid_utf8":
        k = rng.randrange(len(TINY_YAML))
        return TINY_YAML.encode()[:k] + b"\xff\xfe" + TINY_YAML.encode()[k:], f"invalid UTF-8 at {k}"
    if kind == "nul":
        k = rng.randrange(len(TINY_YAML))
        return TINY_YAML[:k] + "\x00" + TINY_YAML[k:], f"NUL at {k}"
    if kind == "bom":
        return BOMS["utf-8"] + TINY_YAML.encode(), "utf-8 BOM"
    return TINY_YAML.encode("utf-16"), "UTF-16"


YAML_MUTATORS: dict[str, tuple[Callable, int]] = {
    "syntax": (_yaml_syntax, 12), "wrong_type": (_yaml_wrong_type, 12), "unknown_key": (_yaml_unknown, 6),
    "top_level": (_yaml_top, 8), "numbers": (_yaml_numbers, 12), "nested": (_yaml_nested, 6),
    "binary": (_yaml_binary, 10), "empty": (lambda rng: (rng.choice(["", "\n", "# only a comment\n", "---\n"]), "empty"), 4),
}


def _yaml_cases() -> list:
    return [pytest.param(name, i, id=f"yaml-{name}-{i}") for name, (_, n) in YAML_MUTATORS.items() for i in range(n)]


@pytest.mark.parametrize("name,i", _yaml_cases())
def test_yaml_fuzz_loads_or_fails_in_one_line_per_problem(tmp_path, name, i):
    text, note = YAML_MUTATORS[name][0](_rng("yaml", name, i))
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        cfg = config.load_config(str(path), [f"run.dir={tmp_path}"])
    except ConfigError as e:
        assert e.problems, note
        for problem in e.problems:
            assert_one_line(problem, str(path), ": ")  # the file, or the key at fault
        return
    assert name not in ("top_level", "unknown_key") or text.strip() in ("null", "~", "---\n..."), note
    assert isinstance(cfg, config.Config)


# ------------------------------------------------------------------------------- through the real CLI


def _cli_error(proc, culprit: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medgen:")]
    assert errors and culprit in errors[0], proc.stderr[-3000:]
    assert len(errors) == 1 or all(ln.startswith("medgen: config error:") for ln in errors), proc.stderr[-3000:]


def _cli_csv(tmp_path: Path, name: str, i: int) -> tuple[list[str], str]:
    case = CSV_MUTATORS[name][0](_rng("csv", name, i))
    src = tmp_path / "fuzz.csv"
    src.write_bytes(case.data)
    return ["prepare", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", f"data.source={src}"], str(src)


def _cli_yaml(tmp_path: Path, name: str, i: int) -> tuple[list[str], str]:
    text, _ = YAML_MUTATORS[name][0](_rng("yaml", name, i))
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["validate", "--config", str(path), f"run.dir={tmp_path}"], ""


def _cli_prompts(tmp_path: Path, data: bytes) -> tuple[list[str], str]:
    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    return ["generate", "--config", "configs/tiny.yaml", f"run.dir={tmp_path}", f"generate.prompts={path}",
            "model.base_only=true"], str(path)


def _first_yaml_error(name: str) -> int:
    """The first seed of a YAML mutation class that PyYAML rejects."""
    def broken(i: int) -> bool:
        try:
            yaml.safe_load(YAML_MUTATORS[name][0](_rng("yaml", name, i))[0])
        except yaml.YAMLError:
            return True
        return False
    return next(i for i in range(200) if broken(i))


def _first(kind: str, name: str, want: Callable[[Case], bool]) -> int:
    """The first seed of a CSV mutation class whose case ``want`` picks (so the CLI sees an error case)."""
    return next(i for i in range(200) if want(CSV_MUTATORS[name][0](_rng(kind, name, i))))


CLI_CASES = {
    "csv-wrong_delimiter": lambda t: _cli_csv(t, "wrong_delimiter", 0),
    "csv-bom-utf16": lambda t: _cli_csv(t, "bom", _first("csv", "bom", lambda c: "UTF-16" in c.note or "utf-16" in c.note)),
    "csv-unbalanced_quotes": lambda t: _cli_csv(t, "unbalanced_quotes", _first("csv", "unbalanced_quotes", lambda c: c.outcome == "error")),
    "yaml-syntax": lambda t: _cli_yaml(t, "syntax", _first_yaml_error("syntax")),
    "yaml-binary": lambda t: _cli_yaml(t, "binary", 0),
    "yaml-nested": lambda t: _cli_yaml(t, "nested", 5),
    "yaml-numbers": lambda t: _cli_yaml(t, "numbers", 2),
    "yaml-top_level": lambda t: _cli_yaml(t, "top_level", 0),
    "prompts-malformed_json": lambda t: _cli_prompts(t, b'{"id": "a", "prompt": "caf\xe9"}\n' + b"[" * 100000),
}


@pytest.mark.parametrize("kind", list(CLI_CASES))
@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_cli_exit_2_and_one_line_never_a_traceback(tmp_path, kind):
    args, culprit = CLI_CASES[kind](tmp_path)
    proc = medgen(*args, check=False, timeout=300)
    _cli_error(proc, culprit)
