"""The packed training stream: disjoint and complete per rank, world-size independent, exactly resumable."""
import itertools
import json

import pytest
import torch

from medgen.data.shards import shard_refs
from medgen.data.stream import PackedStream, collate, iter_shard

SEP = 50256


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tests.helpers import medgen

    run = tmp_path_factory.mktemp("stream")
    medgen("prepare", "--config", "configs/tiny.yaml", f"run.dir={run}", "data.num_shards=4")
    url = str(run / "data")
    return url, json.loads((run / "data" / "manifest.json").read_text())


def _stream(prepared, rank=0, world=1, streams=2, block=64, mode="wrapped"):
    url, manifest = prepared
    return PackedStream(url, manifest, {}, block, SEP, mode, streams, rank, world)


def _segments(url, manifest, shard_ids):
    shards = shard_refs(url, manifest, "train")
    return [r["input_ids"] + [SEP] for i in shard_ids for r in iter_shard(shards[i], {}, ["input_ids"])]


def test_ranks_read_disjoint_shards_and_together_all_tokens(prepared):
    url, manifest = prepared
    total = 0
    for rank in (0, 1):
        ds = _stream(prepared, rank, 2, streams=2)
        mine = [i for i in range(4) if i % 2 == rank]  # stream v reads shards v, v+2
        expected = list(itertools.chain(*_segments(url, manifest, mine)))
        n_blocks = len(expected) // 64
        got = [tok for item in itertools.islice(iter(ds), n_blocks) for tok in item["input_ids"]]
        assert got == expected[: n_blocks * 64]  # every token once, in order, nothing from the other rank
        total += len(expected)
    assert total == sum(s["tokens"] for s in manifest["splits"]["train"]["shards"]) + \
        manifest["splits"]["train"]["articles"]  # + one separator per article


def test_one_process_serves_the_same_global_batches_as_two(prepared):
    one = [it["sample"] for it in itertools.islice(iter(_stream(prepared, 0, 1, streams=2)), 40)]
    r0 = [it["sample"] for it in itertools.islice(iter(_stream(prepared, 0, 2, streams=2)), 20)]
    r1 = [it["sample"] for it in itertools.islice(iter(_stream(prepared, 1, 2, streams=2)), 20)]
    assert one == [s for pair in zip(r0, r1) for s in pair]
    assert not set(r0) & set(r1)


@pytest.mark.parametrize("k", [0, 1, 7, 33, 95])  # 95 blocks is past the end of an epoch of a stream
def test_restored_position_continues_with_exactly_the_next_block(prepared, k):
    ref = list(itertools.islice(iter(_stream(prepared)), k + 5))
    ds = _stream(prepared)
    it = iter(ds)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(ds.state_dict()))  # survives a round trip through a file
    fresh = _stream(prepared)
    fresh.load_state_dict(state)
    assert [x["input_ids"] for x in itertools.islice(iter(fresh), 5)] == [x["input_ids"] for x in ref[k:]]


def test_epochs_cycle(prepared):
    ds = _stream(prepared, streams=1, block=256)
    list(itertools.islice(iter(ds), 200))
    assert ds.state_dict()["streams"]["0"]["epoch"] >= 1


def test_documents_mode_restarts_positions_and_masks_piece_starts(prepared):
    items = list(itertools.islice(iter(_stream(prepared, mode="documents", block=128)), 30))
    batch = collate([dict(it) for it in items])
    pos, labels, ids = batch["position_ids"], batch["labels"], batch["input_ids"]
    assert "attention_mask" not in batch
    assert (labels[pos == 0] == -100).all() and (labels[pos > 0] == ids[pos > 0]).all()
    starts = (pos == 0).sum().item()
    assert starts > len(items)  # several documents per block
    for row_ids, row_pos in zip(ids.tolist(), pos.tolist()):
        for i, p in enumerate(row_pos):
            if p == 0 and i:  # a new piece starts with the separator unless it continues a document
                assert row_ids[i] == SEP or row_pos[i - 1] != 0


def test_documents_mode_is_exact_packing():
    """Position ids restarting per document isolate documents (no cross attention) with use_cache=False."""
    from medgen import models

    model = models.load_model("tiny-gpt2").eval()
    a, b = [464, 3290, 318, 257, 1332], [40, 588, 616]
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([a + b]), position_ids=torch.tensor([list(range(5)) + list(range(3))]),
                       use_cache=False).logits
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits
    assert (packed[0, 5:] - alone[0]).abs().max().item() < 1e-5


def test_too_few_shards_is_a_clear_error(prepared):
    with pytest.raises(ValueError, match="cannot feed 8 streams"):
        _stream(prepared, streams=8)
