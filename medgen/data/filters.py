"""Article filters that need state or a model: language ID, exact and near-duplicate detection.

Near-duplicates: MinHash (datasketch) over word 5-gram shingles of the dedup normal form, banded LSH
with datasketch's (bands, rows) for the threshold. The index keeps one 64-bit hash per band per kept
article in plain sets (measured +151 MiB for 192k articles; datasketch's MinHashLSH +666 MiB), and no
signatures: an LSH candidate is a duplicate, as in datasketch's own query. The first
article seen of a near-duplicate cluster is kept, in every split: the index is shared by all splits.
"""
from __future__ import annotations

import hashlib
import zlib

import numpy as np

from medgen.data.clean import normalise_for_dedup
from medgen.errors import UserError

SHINGLE_WORDS = 5
LANGUAGE_SAMPLE_CHARS = 1000  # py3langid walks every byte in Python: ~1 ms per 1000 chars
LANGUAGE_MIN_CONFIDENCE = 0.5  # below it the language is "und"; real English articles score >= 0.84
_MIX = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, to combine word hashes into shingle hashes


# The codes py3langid's model can return (its model file takes seconds to load: `validate` checks against this
# list; tests/test_filters.py checks it against the model)
LANGID_LABELS = frozenset({
    "ace", "af", "am", "an", "ar", "ary", "arz", "as", "az", "ba", "bcl", "be", "bg", "bn", "br", "bs", "ca",
    "crh", "cs", "cy", "da", "de", "dz", "el", "en", "eo", "es", "et", "eu", "ext", "fa", "fi", "fo", "fr", "fuv",
    "fy", "ga", "gcf", "gcr", "gd", "gl", "gom", "grc", "gu", "gug", "guw", "ha", "hbo", "he", "hi", "hr", "ht",
    "hu", "hy", "id", "ig", "is", "it", "ja", "jv", "ka", "kab", "kik", "kk", "km", "kn", "ko", "ku", "ky", "la",
    "lb", "lg", "lij", "ln", "lo", "lt", "ltg", "lv", "mg", "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl",
    "nn", "no", "nso", "oc", "om", "or", "pa", "pcm", "pl", "ps", "pt", "qu", "ro", "ru", "rw", "sa", "sdh", "se",
    "si", "sk", "sl", "sn", "so", "sq", "sr", "st", "sv", "sw", "ta", "te", "tg", "th", "tk", "tl", "tr", "tt",
    "ug", "uk", "ur", "uz", "uzs", "vec", "vi", "vo", "wa", "wuu", "xh", "yo", "yue", "zh", "zu", "zxx",
})


def check_languages(languages: list[str]) -> list[str]:
    return [f"data.languages: unknown language code {code!r}; use ISO 639-1 codes such as en, de, fr "
            f"(known: {', '.join(sorted(LANGID_LABELS))})" for code in languages if code not in LANGID_LABELS]


class LanguageFilter:
    """py3langid (its model ships inside the wheel: nothing is fetched) on the start of the article.

    ``detect`` returns an ISO 639-1 code, or "und" when the text carries too little evidence
    (numbers, symbols, a few words); "und" is never in ``languages``, so such articles are dropped.
    """

    def __init__(self, languages: list[str]):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        problems = check_languages(languages)
        if problems:
            raise UserError(problems[0])
        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.languages = set(languages)

    def detect(self, text: str) -> str:
        code, confidence = self.identifier.classify(text[:LANGUAGE_SAMPLE_CHARS])
        return code if confidence >= LANGUAGE_MIN_CONFIDENCE else "und"


class ExactDuplicates:
    """Remembers a 16-byte digest of the dedup normal form of every article it is shown."""

    def __init__(self):
        self.seen: set[bytes] = set()

    def check_and_add(self, text: str) -> bool:
        """True when an article with the same normal form was added before; else remember this one."""
        key = hashlib.blake2b(normalise_for_dedup(text).encode(), digest_size=16).digest()
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


class NearDuplicates:
    """MinHash LSH over word 5-grams; ``check_and_add`` keeps the first article of a cluster."""

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)  # only for its optimal (bands, rows)
        self.bands, self.rows = lsh.b, lsh.r
        self.template = MinHash(num_perm=num_perm, hashfunc=int)  # shingles arrive already hashed
        self.index: list[set[int]] = [set() for _ in range(self.bands)]

    def signature(self, text: str) -> np.ndarray:
        words = normalise_for_dedup(text).split() or [""]
        hashes = np.fromiter((zlib.crc32(w.encode()) for w in words), np.uint64, len(words))
        n = min(SHINGLE_WORDS, len(hashes))
        count = len(hashes) - n + 1
        shingles = np.zeros(count, np.uint64)
        for k in range(n):
            shingles = shingles * _MIX + hashes[k:k + count]
        shingles = np.unique((shingles ^ (shingles >> np.uint64(32))) & np.uint64(0xFFFFFFFF))
        minhash = self.template.copy()
        minhash.update_batch(shingles.tolist())
        return minhash.hashvalues

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        r = self.rows
        return [
            int.from_bytes(hashlib.blake2b(signature[i * r:(i + 1) * r].tobytes(), digest_size=8).digest(), "little")
            for i in range(self.bands)
        ]

    def check_and_add(self, text: str) -> bool:
        """True when ``text`` shares an LSH band with an article added before; else add it."""
        keys = self._band_keys(self.signature(text))
        if any(key in band for key, band in zip(keys, self.index)):
            return True
        for key, band in zip(keys, self.index):
            band.add(key)
        return False
