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


def exact_key(normal: str) -> bytes:
    """16-byte digest of an article's dedup normal form (``clean.normalise_for_dedup``)."""
    return hashlib.blake2b(normal.encode(), digest_size=16).digest()


class ExactDuplicates:
    """Remembers the exact key of every article it is shown."""

    def __init__(self):
        self.seen: set[bytes] = set()

    def check_and_add(self, key: bytes) -> bool:
        """True when an article with the same key was added before; else remember this one."""
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


# MurmurHash3's 32-bit finaliser, the pre-mix of datasketch's "affine32" MinHash scheme
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))


def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = _FMIX32
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s3)


class MinHashBands:
    """Text -> LSH band keys: MinHash over word 5-gram shingles, banded with datasketch's (bands, rows).

    Pure per-article work (it runs in prepare's worker processes). The signature is datasketch's
    ``MinHash(num_perm, hashfunc=int)`` of the shingle hashes, computed as one numpy expression over all
    shingles x permutations (datasketch loops over the shingles in Python); tests/test_filters.py checks it
    equals datasketch's own."""

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)  # only for its optimal (bands, rows)
        self.bands, self.rows = lsh.b, lsh.r
        template = MinHash(num_perm=num_perm, hashfunc=int)
        if template.scheme != "affine32":
            raise RuntimeError(f"datasketch's MinHash scheme is {template.scheme!r}; medgen computes 'affine32'")
        a, b = template.permutations
        self.a, self.b = a.astype(np.uint32), b.astype(np.uint32)
        self.empty = template.hashvalues.astype(np.uint32)

    def shingles(self, normal: str) -> np.ndarray:
        """Distinct 32-bit hashes of the word 5-grams of a dedup normal form (one 'word' when it is empty)."""
        words = normal.encode().split(b" ") if normal else [b""]
        hashes = np.fromiter(map(zlib.crc32, words), np.uint64, len(words))
        n = min(SHINGLE_WORDS, len(hashes))
        count = len(hashes) - n + 1
        shingles = np.zeros(count, np.uint64)
        for k in range(n):
            shingles = shingles * _MIX + hashes[k:k + count]
        return np.unique((shingles ^ (shingles >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)

    def signature(self, normal: str) -> np.ndarray:
        return self.minhash(self.shingles(normal))

    def minhash(self, shingles: np.ndarray) -> np.ndarray:
        """The MinHash of uint32 shingle hashes: per permutation, the least (fmix32(h) * a + b) mod 2**32."""
        hv = _fmix32(shingles)[:, None]
        return np.minimum(self.empty, (hv * self.a + self.b).min(axis=0))

    def keys(self, normal: str) -> list[int]:
        return self.band_keys(self.signature(normal))

    def band_keys(self, signature: np.ndarray) -> list[int]:
        """One 64-bit key per band of the signature."""
        r = self.rows
        return [
            int.from_bytes(hashlib.blake2b(signature[i * r:(i + 1) * r].tobytes(), digest_size=8).digest(), "little")
            for i in range(self.bands)
        ]


class NearDuplicates:
    """The LSH index: ``check_and_add`` keeps the first article of a cluster (order-dependent: runs in one process)."""

    def __init__(self, bands: int):
        self.index: list[set[int]] = [set() for _ in range(bands)]

    def check_and_add(self, keys: list[int]) -> bool:
        """True when ``keys`` share a band with an article added before; else add them."""
        if any(key in band for key, band in zip(keys, self.index)):
            return True
        for key, band in zip(keys, self.index):
            band.add(key)
        return False
