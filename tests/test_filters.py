"""Language ID and duplicate detection, unit level (prepare-level checks are in test_prepare_data.py)."""
import pytest

from medgen.data import filters
from medgen.data.filters import ExactDuplicates, LanguageFilter, NearDuplicates
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


def test_exact_duplicates_ignore_case_punctuation_and_spacing():
    d = ExactDuplicates()
    assert not d.check_and_add("Hello, World!\n\nBye.")
    assert d.check_and_add("hello world  bye")
    assert not d.check_and_add("hello world, bye bye")


def _edit(text: str, every: int) -> str:
    words = text.split()
    return " ".join("changed" if i % every == 0 else w for i, w in enumerate(words))


def test_near_duplicates_keep_the_first_of_a_cluster():
    near = NearDuplicates(threshold=0.8, num_perm=128)
    originals = [english(i, words=400) for i in range(30)]
    assert not any(near.check_and_add(t) for t in originals)
    # one word in 200 changed: Jaccard ~0.95, which LSH (9 bands x 13 rows) flags with p ~0.998
    assert all(near.check_and_add(_edit(t, 200)) for t in originals)
    # one word in 5 changed: every shingle touched -> a different article
    assert not any(near.check_and_add(_edit(t, 5)) for t in originals[:10])


def test_near_duplicate_detection_is_deterministic():
    a, b = NearDuplicates(0.8, 64), NearDuplicates(0.8, 64)
    text = english(7, words=300)
    assert (a.signature(text) == b.signature(text)).all()
