"""The checkpoint protocol alone (medgen/checkpoint.py), on plain folders: only committed checkpoints count,
the newest k are kept, a cut-short one is never resumed from, stream states merge for any world size."""
import json

import pytest

from medgen.checkpoint import Checkpoints
from medgen.errors import UserError


def _written_by_trainer(ckpts: Checkpoints, step: int, ranks: int = 1) -> None:
    ckpts.partial(step).mkdir(parents=True)
    (ckpts.partial(step) / "adapter_model.safetensors").write_bytes(b"weights")
    for rank in range(ranks):  # two streams per rank, as train.data_streams=2 x ranks
        ckpts.add_stream_state(step, rank, {"num_streams": 2 * ranks, "next": rank,
                                            "streams": {str(v): {"row": step} for v in range(rank, 2 * ranks, ranks)}})


def test_only_committed_checkpoints_count_and_the_newest_k_are_kept(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=2)
    assert ckpts.newest() is None and ckpts.complete() == []
    for step in (2, 4, 6):
        _written_by_trainer(ckpts, step)
        assert ckpts.commit(step, world_size=1) == tmp_path / f"step-{step}"
    _written_by_trainer(ckpts, 8)  # cut short: never committed
    assert [p.name for p in ckpts.complete()] == ["step-4", "step-6"]
    assert ckpts.newest() == tmp_path / "step-6" and Checkpoints.step(ckpts.newest()) == 6
    assert json.loads((tmp_path / "step-6" / "medgen.json").read_text()) == {"step": 6, "world_size": 1}
    ckpts.remove_partial()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]


def test_stream_states_merge_for_another_world_size_and_refuse_another_stream_count(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=1)
    _written_by_trainer(ckpts, 3, ranks=2)
    ckpt = ckpts.commit(3, world_size=2)
    same = Checkpoints.stream_state(ckpt, 4, [1, 3], world=2)  # rank 1 of 2 again: its round-robin position
    assert same["next"] == 1 and sorted(same["streams"]) == ["0", "1", "2", "3"]
    one = Checkpoints.stream_state(ckpt, 4, [0, 1, 2, 3], world=1)  # every stream on one process
    assert one["next"] == 0 and sorted(one["streams"]) == ["0", "1", "2", "3"]
    with pytest.raises(UserError, match=r"train.data_streams: checkpoint .*step-3 was trained with 4 data streams, "
                                        r"this run has 2"):
        Checkpoints.stream_state(ckpt, 2, [0, 1], world=1)


def test_a_resume_on_another_world_size_keeps_the_streams_and_the_global_batch():
    from medgen import elastic
    from medgen.config import TrainConfig

    t = TrainConfig(batch_size=4, grad_accum=1)
    started = elastic.first_start(t, world=2, train_shards=4)
    assert (started.streams, started.global_batch) == (4, 8)  # one stream per shard, a multiple of 2
    rec = started.as_dict()
    assert elastic.resumed(t, 1, rec, "ck") == elastic.Shape(4, 8, 4, 2, 1)  # the batch kept, accumulation 2
    assert elastic.resumed(t, 4, rec, "ck") == elastic.Shape(4, 8, 2, 1, 4)  # the largest batch that fits
    assert elastic.resumed(TrainConfig(batch_size=3), 1, rec, "ck") == elastic.Shape(4, 8, 2, 4, 1)
    with pytest.raises(UserError, match=r"reads 4 data streams, which 3 processes cannot share .* resume it on "
                                        r"1, 2, 4 processes"):
        elastic.resumed(t, 3, rec, "ck")
    with pytest.raises(UserError, match=r"train.data_streams: checkpoint ck was trained with 4 data streams, this run "
                                        r"has 2"):
        elastic.resumed(TrainConfig(data_streams=2), 2, rec, "ck")
    assert elastic.describe_change(rec, elastic.resumed(t, 2, rec, "ck")) is None
    assert "checkpointed on 2 processes on 1" in elastic.describe_change(rec, elastic.resumed(t, 1, rec, "ck"))


@pytest.mark.parametrize("world, shards, streams", [(1, 2, 2), (2, 2, 2), (3, 8, 6), (4, 2, 4), (1, 500, 64),
                                                    (128, 256, 128)])
def test_default_streams_are_the_shards_a_multiple_of_the_processes(world, shards, streams):
    from medgen import elastic

    assert elastic.default_streams(world, shards) == streams


def test_a_resume_is_refused_only_where_what_the_checkpoint_holds_changed(tmp_path):
    holds = {"lora.r": 16, "lora.target_modules": [], "data": "d9d6"}
    Checkpoints.same_run(holds, dict(holds), tmp_path / "step-4")  # the same settings
    Checkpoints.same_run(None, holds, tmp_path / "step-4")  # written before checkpoints recorded them
    with pytest.raises(UserError, match=r"step-4 was trained with other settings \(lora.r 16 -> 8; "
                                        r"lora.target_modules \[\] -> \['c_fc'\]\), which fix"):
        Checkpoints.same_run(holds, {**holds, "lora.r": 8, "lora.target_modules": ["c_fc"]}, tmp_path / "step-4")


def test_a_changed_schedule_is_named_on_resume():
    import dataclasses

    from medgen import schedule
    from medgen.config import TrainConfig

    t = TrainConfig(max_steps=8)
    assert schedule.describe_change(schedule.record(t), t, 4) is None
    assert schedule.describe_change(None, t, 4) is None
    before = schedule.record(dataclasses.replace(t, max_steps=4, learning_rate=1e-3))
    assert schedule.describe_change(before, t, 4) == (
        "train: resuming at step 4 with max_steps 4 -> 8, learning_rate 0.001 -> 0.0005: steps 5-8 follow the "
        "cosine schedule of 8 steps as configured now, not the checkpoint's")
    assert "step 4, at or past train.max_steps=3: nothing left to train" in schedule.describe_change(
        before, dataclasses.replace(t, max_steps=3), 4)
