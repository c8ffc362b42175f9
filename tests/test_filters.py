"""Language ID and duplicate detection, unit level (prepare-level checks are in test_prepare_data.py)."""
import pytest

import numpy as np

from medgen.data import filters
from medgen.data.clean import normalise_for_dedup
from medgen.data.filters import ExactDuplicates, LanguageFilter, MinHashBands, NearDuplicates
from medgen.errors import UserError
from tests.articles import FRENCH, GERMAN, SPANISH, english


@pytest.fixture(scope="module")
def lang():
    return LanguageFilter(["en"])


def test_language_is_detected_from_the_text(lang):
    assert lang.detect(english(1)) == "en"
    assert [lang.detect(t) for t in (GERMAN, FRENCH, SPANISH)] == ["de", "fr", "es"]


def test_text_without_language_is_undetermined(lang):
    assert lang.detect("1234 5678 90 !!! 3.14 ?? 42 %% 17") == "und"


def test_language_codes_validate_knows_are_the_models():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    assert set(LanguageIdentifier.from_model_file(MODEL_FILE).labels) == filters.LANGID_LABELS


def test_unknown_language_code_is_a_user_error():
    with pytest.raises(UserError, match="data.languages: unknown language code 'english'"):
        LanguageFilter(["en", "english"])


def _exact(d: ExactDuplicates, text: str) -> bool:
    return d.check_and_add(filters.exact_key(normalise_for_dedup(text)))


def test_exact_duplicates_ignore_case_punctuation_and_spacing():
    d = ExactDuplicates()
    assert not _exact(d, "Hello, World!\n\nBye.")
    assert _exact(d, "hello world  bye")
    assert not _exact(d, "hello world, bye bye")


def _edit(text: str, every: int) -> str:
    words = text.split()
    return " ".join("changed" if i % every == 0 else w for i, w in enumerate(words))


class _Near:
    """Text in, verdict out: the worker half (MinHashBands) and the index half (NearDuplicates) together."""

    def __init__(self, threshold: float, num_perm: int):
        self.bands = MinHashBands(threshold, num_perm)
        self.index = NearDuplicates(self.bands.bands)

    def check_and_add(self, text: str) -> bool:
        return self.index.check_and_add(self.bands.keys(normalise_for_dedup(text)))


def test_near_duplicates_keep_the_first_of_a_cluster():
    near = _Near(threshold=0.8, num_perm=128)
    originals = [english(i, words=400) for i in range(30)]
    assert not any(near.check_and_add(t) for t in originals)
    # one word in 200 changed: Jaccard ~0.95, which LSH (9 bands x 13 rows) flags with p ~0.998
    assert all(near.check_and_add(_edit(t, 200)) for t in originals)
    # one word in 5 changed: every shingle touched -> a different article
    assert not any(near.check_and_add(_edit(t, 5)) for t in originals[:10])


def test_near_duplicate_detection_is_deterministic():
    a, b = MinHashBands(0.8, 64), MinHashBands(0.8, 64)
    text = normalise_for_dedup(english(7, words=300))
    assert (a.signature(text) == b.signature(text)).all()


@pytest.mark.parametrize("num_perm", [16, 128, 256])
def test_vectorised_minhash_is_datasketchs(num_perm):
    """The numpy signature is datasketch's MinHash(num_perm, hashfunc=int) of the same shingles, bit for bit."""
    from datasketch import MinHash

    bands = MinHashBands(0.8, num_perm)
    texts = [english(i, words=n) for i, n in ((1, 400), (2, 7), (3, 1))] + [""]
    for text in map(normalise_for_dedup, texts):
        theirs = MinHash(num_perm=num_perm, hashfunc=int)
        theirs.update_batch(bands.shingles(text).tolist())
        assert np.array_equal(bands.signature(text), theirs.hashvalues), text[:40]
    edge = np.array([0, 1, 2**31, 2**32 - 1], np.uint32)  # the wrap-around of the uint32 products
    theirs = MinHash(num_perm=num_perm, hashfunc=int)
    theirs.update_batch(edge.tolist())
    assert np.array_equal(bands.minhash(edge), theirs.hashvalues)
