"""The watchdog's decisions, in one process: what is a hang, who is named, and no requeue loop
(tests/test_long_runs.py and tests/test_slurm.py stop real ranks)."""
import json
import threading
import time

from medgen import atomic
from medgen.layout import RunLayout
from medgen.watchdog import FAILED, TRY_AGAIN, Watchdog, describe


def _other_rank(layout: RunLayout, rank: int, progress_age: float, beat_age: float, step: int = 4) -> None:
    now = time.time()
    layout.ranks.mkdir(parents=True, exist_ok=True)
    # written as the watchdog writes heartbeats: whole, by a rename (a reader never sees half a file)
    atomic.write_text(str(layout.heartbeat("train", rank)), json.dumps({
        "rank": rank, "world_size": 2, "host": "node2", "pid": 4242, "phase": "step", "step": step,
        "progress_time": now - progress_age, "beat_time": now - beat_age}))


def _watch(layout: RunLayout, step: int = 4, timeout: float = 0.8) -> tuple[Watchdog, list[dict]]:
    hangs: list[dict] = []
    dog = Watchdog(layout, "train", 0, 2, timeout, timeout, on_hang=hangs.append)
    dog.mark("step", step)
    return dog.start(), hangs


def _wait(hangs: list, seconds: float) -> None:
    deadline = time.time() + seconds
    while not hangs and time.time() < deadline:
        time.sleep(0.05)


def test_a_stopped_rank_is_named_and_the_stage_is_tried_again(tmp_path):
    layout = RunLayout(tmp_path)
    _other_rank(layout, 1, progress_age=100, beat_age=100)  # its heartbeat stopped: a frozen process
    dog, hangs = _watch(layout)
    _wait(hangs, 15)
    dog.stop()
    assert hangs, "no hang reported"
    rep = hangs[0]
    assert rep["code"] == TRY_AGAIN and rep["reporter"] == 0 and rep["step"] == 4
    assert {r["rank"]: r["state"] for r in rep["ranks"]} == {0: "waiting", 1: "stopped responding"}
    assert (tmp_path / "hang" / "train.json").exists() and (tmp_path / "hang" / "train-rank-00000-stacks.txt").exists()
    assert "rank 1 on node2 (pid 4242): stopped responding" in describe(rep)


def test_a_rank_that_still_progresses_is_not_a_hang(tmp_path):
    """This rank waits in a collective while another works (an idle evaluate rank): not hung."""
    layout = RunLayout(tmp_path)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            _other_rank(layout, 1, progress_age=0, beat_age=0)
            time.sleep(0.1)

    worker = threading.Thread(target=busy)
    worker.start()
    dog, hangs = _watch(layout, timeout=1.5)
    time.sleep(5)  # well past the timeout
    dog.stop()
    stop.set()
    worker.join()
    assert not hangs


def test_a_second_hang_at_the_same_step_fails_instead_of_requeueing_forever(tmp_path):
    layout = RunLayout(tmp_path)
    _other_rank(layout, 1, progress_age=100, beat_age=100)
    codes = []
    for step in (4, 4, 6):
        dog, hangs = _watch(layout, step=step)
        _wait(hangs, 15)
        dog.stop()
        codes.append(hangs[0]["code"])
        _other_rank(layout, 1, progress_age=100, beat_age=100, step=step)
    assert codes == [TRY_AGAIN, FAILED, TRY_AGAIN]  # a resumed run that got further may hang (and retry) again
    rep = json.loads((tmp_path / "hang" / "train.json").read_text())
    assert rep["previous"]["step"] == 4


def test_the_start_has_its_own_timeout(tmp_path):
    layout = RunLayout(tmp_path)
    hangs: list[dict] = []
    dog = Watchdog(layout, "evaluate", 0, 1, hang_timeout=0.5, start_timeout=60, on_hang=hangs.append).start()
    time.sleep(2)  # past the hang timeout, but nothing has progressed yet: loading a model is the start
    assert not hangs
    dog.mark("eval base", None)
    _wait(hangs, 15)
    dog.stop()
    assert hangs and hangs[0]["timeout_setting"] == "run.hang_timeout"
