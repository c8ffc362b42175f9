"""Text cleaning: named rules applied in order, each counted when it changes an article.

What each rule removes (docs/data.md has examples):
- ``html``: tags like ``<br>``/``<p class=..>`` and entities (``&amp;`` -> ``&``, ``&nbsp;`` -> space).
- ``image_credits``: whole lines such as "Photo by Jane Doe on Unsplash" / "Image by X from Pixabay" / "Source: ...".
- ``urls``: http(s)://..., www.... and bare domain/path links.
- ``emails``: name@host.tld.
- ``mentions``: @handles (not e-mail addresses, which ``emails`` handles first).
- ``emoji``: pictographs, dingbats, flags, variation selectors, zero-width joiners.
- ``special_chars``: control and zero-width characters, private-use and unassigned code points, and
  decorative symbols (bullets, arrows, box drawing); curly quotes and dashes become ASCII.
- ``whitespace``: runs of spaces/tabs become one space; 3+ newlines become a paragraph break.

NFKC normalisation always runs first (full-width letters, ligatures, non-breaking spaces).
"""
from __future__ import annotations

import html as _html
import re
import unicodedata
from typing import Callable

_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_ENTITY = re.compile(r"&(?:[a-zA-Z]{2,8}|#\d{1,6}|#x[0-9a-fA-F]{1,6});")
_CREDIT = re.compile(
    r"^[ \t]*(?:(?:photo|image|picture|illustration|cover image|header image)s?\s+(?:by|from|courtesy of|credit)"
    r"|(?:image|photo)\s+(?:source|credit)s?\s*:|source\s*:)[^\n]*$\n?",
    re.IGNORECASE | re.MULTILINE,
)
_URL = re.compile(
    r"(?:https?://|ftp://|www\.)[^\s<>\"')\]]+"
    r"|\b[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*\.(?:com|org|net|io|ai|dev|co|ly|me)/[^\s<>\"')\]]*",
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_](?:[A-Za-z0-9_.]*[A-Za-z0-9_])?")
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U0001F1E6-\U0001F1FF\U0000FE00-\U0000FE0F\U0000200D\U000020E3]"
)
_ASCII_PUNCT = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"',
    "\u2013": "-", "\u2014": " - ", "\u2212": "-", "\u2026": "...", "\u00a0": " ",
})
# special_chars removes controls (except \n \t), format characters (zero-width), private use, unassigned
# and surrogates, and turns decoration into a space: other symbols (So), bullets, arrows, box drawing.
_REMOVE_CATEGORIES = {"Cc", "Cf", "Co", "Cn", "Cs"}
_DECORATION = re.compile("[\u2022\u2023\u2043\u00b7\u2219\u2190-\u21ff\u2500-\u25ff\u27f0-\u27ff\u2900-\u297f]")
_SPACES = re.compile(r"[ \t\f\v]+")
_TRAILING = re.compile(r" *\n *")
_PARAGRAPHS = re.compile(r"\n{3,}")


def _special_chars(text: str) -> str:
    text = _DECORATION.sub(" ", text.translate(_ASCII_PUNCT))
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\n\t" or (cat not in _REMOVE_CATEGORIES and cat != "So"):
            out.append(ch)
        elif cat == "So":
            out.append(" ")
    return "".join(out)


def _whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    return _PARAGRAPHS.sub("\n\n", text).strip()


RULES: dict[str, Callable[[str], str]] = {
    "html": lambda t: _ENTITY.sub(lambda m: _html.unescape(m.group(0)), _TAG.sub(" ", t)).replace("\u00a0", " "),
    "image_credits": lambda t: _CREDIT.sub("", t),
    "urls": lambda t: _URL.sub("", t),
    "emails": lambda t: _EMAIL.sub("", t),
    "mentions": lambda t: _MENTION.sub("", t),
    "emoji": lambda t: _EMOJI.sub("", t),
    "special_chars": _special_chars,
    "whitespace": _whitespace,
}


def check_rules(names: list[str]) -> list[str]:
    return [f"data.clean_rules: unknown rule {n!r} (known: {', '.join(RULES)})" for n in names if n not in RULES]


def clean_text(text: str, rules: list[str], counts: dict[str, int] | None = None) -> str:
    """Apply ``rules`` in order; ``counts[rule]`` += 1 for each rule that changed the text."""
    text = unicodedata.normalize("NFKC", text)
    for name in rules:
        new = RULES[name](text)
        if counts is not None and new != text:
            counts[name] = counts.get(name, 0) + 1
        text = new
    return text


def normalise_for_dedup(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form used for exact-duplicate detection."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())
