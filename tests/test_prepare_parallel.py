"""prepare on several worker processes and several source files: the same bytes whatever the split (issue #16)."""
import csv
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from medgen.data import workers
from tests.articles import FRENCH, GERMAN, HEADER, SPANISH, english, row, write_csv
from tests.helpers import SHARED, TINY, medgen
from tests.test_prepare_data import _near_copy



def _real_rows() -> list[list[str]]:
    csv.field_size_limit(sys.maxsize)
    with open(SHARED / "medium-articles-500.csv", newline="", encoding="utf-8") as f:
        return [[r[h] for h in HEADER] for r in csv.DictReader(f)]


def _prepare(tmp_path: Path, name: str, source, *overrides: str) -> tuple[Path, str]:
    data = tmp_path / name
    src = "[" + ",".join(map(str, source)) + "]" if isinstance(source, list) else str(source)
    proc = medgen("prepare", *TINY, f"run.dir={tmp_path / 'run'}", f"data.source={src}", f"data.shards={data}",
                  *overrides)
    return data, proc.stderr


def _output(data: Path) -> dict:
    """Every file's sha256, the manifest without its creation time, the report without its timing (not the record
    of the run, medgen_config.json, which says how many workers ran and when)."""
    out = {str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data.rglob("*"))
           if p.is_file() and p.name not in ("manifest.json", "prepare_report.json", "medgen_config.json")}
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.pop("created")
    report = json.loads((data / "prepare_report.json").read_text())
    report.pop("timing")
    return {"files": out, "manifest": manifest, "report": report}


def _logged_workers(stderr: str) -> int:
    found = re.findall(r"prepare: (\d+) worker process", stderr)
    assert len(found) == 1, stderr[-3000:]
    return int(found[0])


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_any_number_of_workers_writes_the_same_bytes(tmp_path, medium_sample):
    """The real sample, plus what makes order matter: exact and near copies close to and far from their original
    (same chunk, another chunk, another worker), foreign languages, malformed and repaired rows."""
    real = _real_rows()
    rows = real[:300]
    rows += [_near_copy(r, i) for i, r in enumerate(real[:40:3])]  # far from their originals
    for i, r in enumerate(real[300:]):
        rows.append(r)
        if i % 17 == 0:  # right after the original: the same chunk of 64
            rows.append([r[0], r[1].upper(), r[2] + f"-exact-{i}", *r[3:]])
        if i % 23 == 0:
            rows.append(_near_copy(r, 1000 + i))
    rows += [row(9000 + i, text=t) for i, t in enumerate((GERMAN, FRENCH, SPANISH))]
    rows += [row(9100, text=""), row(9101, timestamp="not a date"), row(9102, tags="['unclosed"),
             row(9103) + ["EXTRA"], row(9104)[:3], row(9105, text=english(1))]
    src = write_csv(tmp_path / "mixed.csv", rows)
    with open(src, "ab") as f:
        f.write(b'Bytes,"' + english(16).encode() + b' caf\xe9 \xff",https://m.example/16,[],2020-01-01,[]\n')
    outputs = {}
    for n in (1, 2, 3):
        data, stderr = _prepare(tmp_path, f"w{n}", src, f"data.workers={n}", "data.chunk_rows=150")
        assert _logged_workers(stderr) == n
        timing = json.loads((data / "prepare_report.json").read_text())["timing"]
        assert timing["workers"] == n and timing["cpu_seconds"]["tokenize"] > 0, timing
        outputs[n] = _output(data)
    report = outputs[1]["report"]
    dropped = report["dropped"]
    assert dropped["duplicate_exact"] >= 8 and dropped["duplicate_near"] >= 15, dropped
    assert dropped["wrong_language"] >= 3 and dropped["wrong_field_count"] == 2, dropped
    assert report["warnings"]["invalid_utf8_replaced"] == 1, report["warnings"]
    assert outputs[2] == outputs[1]
    assert outputs[3] == outputs[1]


@pytest.mark.slow  # whole CLI or pipeline runs: not in the fast tier
def test_a_glob_over_three_files_is_their_concatenation(tmp_path, medium_sample):
    real = _real_rows()[:150]
    parts = {"b.csv": real[50:100], "c.csv": real[100:], "a.csv": real[:50]}  # written out of name order
    for name, rows in parts.items():
        (tmp_path / "parts").mkdir(exist_ok=True)
        write_csv(tmp_path / "parts" / name, rows)
    whole = write_csv(tmp_path / "whole.csv", real)
    one, _ = _prepare(tmp_path, "whole", str(whole))
    glob, _ = _prepare(tmp_path, "glob", str(tmp_path / "parts" / "*.csv"))
    listed, _ = _prepare(tmp_path, "list", [tmp_path / "parts" / n for n in ("a.csv", "b.csv", "c.csv")])
    a, b, c = (_output(d) for d in (one, glob, listed))
    assert a["files"] == b["files"] == c["files"]  # every shard, byte for byte
    assert a["manifest"]["splits"] == b["manifest"]["splits"] == c["manifest"]["splits"]
    source_keys = ("source", "source_sha256", "source_files", "source_bytes")
    same = [{k: v for k, v in x["report"].items() if k not in source_keys} for x in (a, b, c)]
    assert same[0] == same[1] == same[2]
    files = b["report"]["source_files"]
    assert [Path(f["url"]).name for f in files] == ["a.csv", "b.csv", "c.csv"]
    assert files == c["report"]["source_files"]
    for f in files:
        assert f["sha256"] == hashlib.sha256(Path(f["url"]).read_bytes()).hexdigest()


def test_a_glob_that_matches_nothing_is_one_line(tmp_path):
    proc = medgen("prepare", *TINY, f"run.dir={tmp_path}", f"data.source={tmp_path}/nothing-*.csv", check=False)
    assert proc.returncode == 2 and f"data.source: no file matches {tmp_path}/nothing-*.csv" in proc.stderr


def test_workers_0_means_the_cpus_this_process_may_use(monkeypatch):
    import os

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert workers.resolve(0) == cpus and workers.resolve(3) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # a SLURM task gets its --cpus-per-task, never more than it may use
    assert workers.resolve(0) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cpus + 5))
    assert workers.resolve(0) == cpus


def test_results_come_back_in_input_order_and_a_worker_error_is_raised():
    chunks = [[i] * (5 - i % 5) for i in range(40)]  # uneven work: later chunks finish first
    assert list(workers.imap_ordered(len, chunks, 3)) == [len(c) for c in chunks]
    with pytest.raises(ZeroDivisionError):
        list(workers.imap_ordered(_invert, [1, 2, 0, 4], 2))


def _invert(x: int) -> float:
    return 1 / x
