"""logs.Progress, the progress of every long loop: log lines at a steady interval where stderr is not a terminal
(a SLURM job log), a tqdm bar where it is, never both; logs.Steps, training's: a line per logged step, and a bar
on a terminal. Real threads, a real pseudo-terminal, real log records."""
import io
import json
import logging
import os
import re
import select
import time

import pytest

from medgen.logs import Progress
from tests.helpers import ROOT, TINY, command, medgen


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="medgen")
    return lambda: [(r.created, r.getMessage()) for r in caplog.records if r.name == "medgen"]


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_lines_come_at_the_interval_with_the_counts_rate_and_time_left(lines):
    every = 0.2
    with Progress("eval base", 100, "windows", every, totals={"articles": 10}, rate="tokens",
                  stream=io.StringIO()) as p:
        for _ in range(10):
            p.update(5, articles=1, tokens=320)
            time.sleep(0.1)
    got = lines()
    assert got[0][1] == "eval base: 0/100 windows, 0/10 articles"
    ticks = got[1:-1]
    assert 3 <= len(ticks) <= 6, got  # ~1 s of work at 0.2 s
    assert max(_gaps([t for t, _ in got])) < every + 0.3, got  # slack: 2 busy shared cores
    for _, text in ticks:
        m = re.fullmatch(r"eval base: (\d+)/100 windows, (\d+)/10 articles, (\d+) tokens, (\d+) tokens/s, "
                         r"about (\d+)s left", text)
        assert m, text
        assert int(m[3]) == 320 * int(m[2]) and int(m[1]) == 5 * int(m[2])
    assert re.fullmatch(r"eval base: 50/100 windows, 10/10 articles, 3200 tokens, \d+ tokens/s, done in 1\.\d s",
                        got[-1][1]), got[-1]


def test_a_loop_that_does_not_advance_still_shows_at_the_interval(lines):
    """A slow batch (generate on a CPU) or a stalled read: the timer thread writes the lines, not the loop."""
    with Progress("generate", 8, "completions", 0.2, rate="tokens", stream=io.StringIO()):
        time.sleep(1.0)
    ticks = [text for _, text in lines()[1:-1]]
    assert len(ticks) >= 3 and all(t == "generate: 0/8 completions, 0 tokens, 0 tokens/s" for t in ticks), ticks


def test_an_unknown_total_shows_what_is_done_and_the_rate_without_a_time_left(lines):
    with Progress("prepare", None, "bytes", 0.2, stream=io.StringIO()) as p:
        for _ in range(5):
            p.update(2_500_000, rows=100)
            time.sleep(0.1)
    got = [text for _, text in lines()]
    assert got[0] == "prepare: 0.0 MB"
    assert any(re.fullmatch(r"prepare: \d+\.\d MB, \d+ rows, \d+\.\d MB/s", t) for t in got[1:-1]), got
    assert re.fullmatch(r"prepare: 12\.5 MB, 500 rows, \d+\.\d MB/s, done in 0\.\d s", got[-1]), got


def test_bytes_of_a_known_total_give_mb_read_of_it_and_the_time_left(lines):
    with Progress("prepare", 40_000_000, "bytes", 0.2, stream=io.StringIO()) as p:
        for _ in range(5):
            p.update(4_000_000, rows=1000)
            time.sleep(0.1)
    ticks = [text for _, text in lines()[1:-1]]
    assert ticks and all(re.fullmatch(r"prepare: \d+\.\d/40\.0 MB, \d+ rows, \d+\.\d MB/s, about \d+s left", t)
                         for t in ticks), ticks


def test_without_ends_only_the_interval_lines(lines):
    """Validation logs its own outcome line: its progress adds the interval lines only."""
    with Progress("validate", 4, "windows", 0.2, ends=False, stream=io.StringIO()) as p:
        time.sleep(0.5)
        p.update(4)
    got = [text for _, text in lines()]
    assert got and all(t == "validate: 0/4 windows, 0 windows/s" for t in got), got


def test_no_end_line_when_the_loop_fails(lines):
    with pytest.raises(RuntimeError), Progress("generate", 8, "completions", 30, stream=io.StringIO()):
        raise RuntimeError("disk full")
    assert [text for _, text in lines()] == ["generate: 0/8 completions"]


def _read_all(fd: int) -> str:
    out = b""
    while select.select([fd], [], [], 0.5)[0]:
        out += os.read(fd, 65536)
    return out.decode()


def test_on_a_terminal_a_bar_and_no_lines(lines):
    """A real pseudo-terminal as stderr: tqdm draws there, the log stays free of progress lines."""
    main, side = os.openpty()
    with open(side, "w") as tty:
        assert tty.isatty()
        with Progress("eval base", 10, "windows", 0.1, rate="tokens", stream=tty) as p:
            for _ in range(10):
                p.update(1, tokens=64)
                time.sleep(0.03)
        tty.flush()
        drawn = _read_all(main)
    os.close(main)
    assert "eval base" in drawn and "10/10" in drawn and "windows" in drawn, drawn
    assert lines() == []


def test_quiet_means_neither_lines_nor_a_bar(caplog):
    caplog.set_level(logging.WARNING, logger="medgen")  # medgen --quiet
    main, side = os.openpty()
    with open(side, "w") as tty:
        with Progress("generate", 4, "completions", 0.1, stream=tty) as p:
            time.sleep(0.3)
            p.update(4)
        assert p.bar is None and not p.lines
    os.close(main)
    assert [r for r in caplog.records if r.name == "medgen"] == []


def test_score_counts_windows_articles_and_tokens(lines):
    """evaluate's loop (validation's too) with a real model: the articles count when their last window is scored."""
    import torch

    from medgen import models
    from medgen.evaluate import plan, score

    tok, model = models.load_tokenizer("tiny-gpt2"), models.load_model("tiny-gpt2").eval()
    arts = [{"input_ids": tok(t)["input_ids"]} for t in ("Short one.", "Numbers 1 2 3 and more words " * 20, "x y")]
    windows = plan(arts, tok.eos_token_id, 32, 16)
    score(model, arts, tok.eos_token_id, 32, 16, 2, torch.device("cpu"), "eval base", every=30)
    got = [text for _, text in lines()]
    assert got[0] == f"eval base: 0/{len(windows)} windows, 0/3 articles"
    assert re.fullmatch(rf"eval base: {len(windows)}/{len(windows)} windows, 3/3 articles, "
                        rf"{sum(len(w.ids) for w in windows)} tokens, \d+ tokens/s, done in \d+\.\d s", got[1]), got
    score(model, arts, tok.eos_token_id, 32, 16, 2, torch.device("cpu"), "validate", every=30, ends=False)
    assert len(lines()) == 2  # validation: lines at the interval only, none in so short a loop


# --------------------------------------------------------------------------- the stages' lines in a log

STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d) medgen INFO (.*)$", re.M)
RATE, LEFT, DONE = r", \d+(\.\d)? \S+/s", r"(, about \S+ left)?", r", done in \d+\.\d s"
# what each stage's lines say before the rate: what is done of the total and the other counts
HEADS = {
    "prepare": r"(?P<done>\d+\.\d)/(?P<total>\d+\.\d) MB(, (?P<rows>\d+) rows)?",
    "eval base": r"(?P<done>\d+)/(?P<total>\d+) windows, (?P<articles>\d+)/(?P<of>\d+) articles"
                 r"(, (?P<tokens>\d+) tokens)?",
    "generate": r"(?P<done>\d+)/(?P<total>\d+) completions(, (?P<tokens>\d+) tokens)?",  # tokens: not at the start
}


def progress_lines(log: str, what: str, every: float, ticks: int = 2) -> list[re.Match]:
    """The progress lines of ``what`` in a log (the job log's HH:MM:SS stamps): a start line, at least ``ticks``
    lines at the interval with the rate (and the time left once something is done), an end line; no gap between
    them longer than ``every`` plus the stamps' second and a second of scheduling slack. Returns the matches of
    their heads (the counts), start to end."""
    head = HEADS[what]
    stamped = [(int(h) * 3600 + int(m) * 60 + int(s), text[len(what) + 2:])
               for h, m, s, text in STAMP.findall(log) if text.startswith(f"{what}: ")]
    found = [(t, text) for t, text in stamped if re.match(head, text)]  # the stage's other lines left out
    start = next(i for i, (_, text) in enumerate(found) if re.fullmatch(head, text))
    end = next(i for i, (_, text) in enumerate(found) if re.fullmatch(head + RATE + DONE, text))
    assert end - start - 1 >= ticks, found
    matches = [re.fullmatch(head, found[start][1])]
    for _, text in found[start + 1:end]:
        m = re.fullmatch(f"({head}){RATE}{LEFT}", text)
        assert m, text
        matches.append(re.fullmatch(head, m[1]))
    matches.append(re.fullmatch(head, re.fullmatch(f"({head}){RATE}{DONE}", found[end][1])[1]))
    times = [t for t, _ in found[start:end + 1]]
    gaps = [(b - a) % 86400 for a, b in zip(times, times[1:])]
    assert max(gaps) <= every + 2, (gaps, found)
    return matches


def _nondecreasing(matches: list[re.Match], *groups: str) -> bool:
    return all(all(float(a[g] or 0) <= float(b[g] or 0) for g in groups) for a, b in zip(matches, matches[1:]))


@pytest.mark.slow  # three CLI runs
def test_prepare_evaluate_and_generate_log_their_progress_where_stderr_is_not_a_terminal(tmp_path, medium_sample):
    """A pipe, as a SLURM job log: no bar, lines with each stage's numbers (test_slurm.py: in a real job log)."""
    common = [*TINY, f"run.dir={tmp_path}", "run.progress_every=0.5", "model.base_only=true"]
    err = medgen("prepare", *common, f"data.source={medium_sample}", "data.workers=1").stderr
    prep = progress_lines(err, "prepare", 0.5)
    size = f"{medium_sample.stat().st_size / 1e6:.1f}"
    assert (prep[0]["done"], prep[-1]["done"], prep[-1]["total"], prep[-1]["rows"]) == ("0.0", size, size, "500")
    assert _nondecreasing(prep, "done", "rows") and "it/s" not in err and "%|" not in err  # no tqdm bar

    # evaluate and generate work for about a second on the tiny model: a shorter interval, so that the lines at
    # the interval do not depend on how fast the machine is
    err = medgen("evaluate", *common, "eval.max_articles=3", "run.progress_every=0.1").stderr
    ev = progress_lines(err, "eval base", 0.1)
    assert ev[-1]["done"] == ev[-1]["total"] and ev[-1]["articles"] == ev[-1]["of"] == "3"
    assert _nondecreasing(ev, "done", "articles", "tokens") and int(ev[-1]["tokens"]) > 0

    err = medgen("generate", *common, "generate.batch_size=2", "generate.max_new_tokens=8",
                 "run.progress_every=0.1").stderr
    gen = progress_lines(err, "generate", 0.1)
    assert (gen[0]["done"], gen[-1]["done"], gen[-1]["total"]) == ("0", "8", "8")
    assert _nondecreasing(gen, "done", "tokens") and 8 <= int(gen[-1]["tokens"]) <= 8 * 8


STEP = re.compile(r"train: step (?P<step>\d+)/(?P<total>\d+), loss (?P<loss>\d+\.\d{4}), grad norm \S+, lr \S+"
                  r"(, (?P<rate>\d+) tokens/s)?, epoch \d+\.\d\d, peak memory \d+\.\d\d GB(, about \S+ left)?")


def _under_a_terminal(argv: list[str], columns: int = 160) -> str:
    """What ``argv`` writes to a real pseudo-terminal of ``columns`` columns (a pty starts 0 wide, where tqdm
    draws nothing)."""
    import fcntl
    import pty
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdin, stdout and stderr are the terminal
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        os.chdir(ROOT)
        os.execvp(argv[0], argv)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert os.waitpid(pid, 0)[1] == 0, out.decode()[-3000:]
    return out.decode()


@pytest.mark.slow  # two trainings through the CLI
def test_training_logs_each_logged_step_with_its_numbers_and_draws_a_bar_only_on_a_terminal(tmp_path, shards):
    """A job log (a pipe): a stamped line per logged step with the numbers of train_log.jsonl, not the Trainer's
    carriage-return bar and printed dicts, nor transformers' "Loading weights" bar. A terminal: the same lines,
    above a bar of the steps."""
    common = [*TINY, f"data.shards={shards}", "train.max_steps=6", "train.logging_steps=2"]
    err = medgen("train", *common, f"run.dir={tmp_path / 'piped'}").stderr
    assert "\r" not in err and "%|" not in err and "{'loss'" not in err and "Loading weights" not in err, err
    stamped = [text for *_, text in STAMP.findall(err) if text.startswith("train: step ")]
    steps = [STEP.fullmatch(text) for text in stamped]
    assert all(steps), stamped
    logged = [json.loads(ln) for ln in (tmp_path / "piped" / "train_log.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss" in r]
    assert [int(m["step"]) for m in steps] == [r["step"] for r in logged] == [2, 4, 6]
    assert [m["loss"] for m in steps] == [f"{r['loss']:.4f}" for r in logged]
    assert all(m["total"] == "6" for m in steps) and steps[1]["rate"] == f"{logged[1]['tokens_per_s']:.0f}"

    drawn = _under_a_terminal(command("train", *common, f"run.dir={tmp_path / 'terminal'}"))
    assert re.search(r"train: +100%\|[^\r\n]*\| 6/6 ", drawn), drawn  # the bar, complete
    lines = [ln.strip("\r") for ln in drawn.split("\n")]
    assert [STEP.search(ln)["step"] for ln in lines if STEP.search(ln)] == ["2", "4", "6"], drawn
    assert "{'loss'" not in drawn
