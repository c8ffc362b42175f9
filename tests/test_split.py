import random

from medgen.data.split import article_id, assign_shard, assign_split


def test_split_depends_only_on_the_article():
    ids = [article_id(f"https://m.example.com/@a/post-{i}", "t", "x") for i in range(2000)]
    first = {i: assign_split(i, 0.1, 0.1) for i in ids}
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert {i: assign_split(i, 0.1, 0.1) for i in shuffled} == first
    counts = {s: list(first.values()).count(s) for s in ("train", "validation", "test")}
    assert 1500 < counts["train"] < 1700 and 150 < counts["test"] < 250, counts


def test_shard_count_does_not_move_articles_between_splits():
    ids = [article_id("", f"title {i}", f"body {i}") for i in range(500)]
    for n in (1, 2, 7):
        assert all(0 <= assign_shard(i, n) < n for i in ids)
    assert [assign_split(i, 0.2, 0.2) for i in ids] == [assign_split(i, 0.2, 0.2) for i in ids]


def test_article_id_normalises_url_and_falls_back_to_content():
    assert article_id("https://M.example.com/x/?utm=1", "a", "b") == article_id("https://m.example.com/x", "c", "d")
    assert article_id("", "a", "b") != article_id("", "a", "c")
