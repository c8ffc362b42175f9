"""Text cleaning: named rules applied in order, each counted when it changes an article.

What each rule removes (docs/data.md has examples and the known limits):
- ``html``: tags of real HTML elements, lower case, on one line (``<br>``, ``<p class=..>``, ``</div>``);
  generics such as ``List<String>``, ``Array<number>``, ``<T>`` stay; entities (``&amp;`` -> ``&``).
- ``image_credits``: whole short lines (at most ~120 chars) that credit a picture: "Photo by Jane Doe
  on Unsplash", "Image courtesy of NASA", "Photo: Getty Images", "Source: Pixabay", "Credit: X".
- ``urls``: http(s)://, ftp:// and www. links, and bare links on common domains (``github.com/a/b``);
  a link's trailing sentence punctuation and closing quote/bracket stay.
- ``emails``: name@host.tld.
- ``mentions``: @handles in prose. Kept: code-like uses (``@Override``, ``@app.route(...)``,
  ``'@angular/core'``, ``@media``), anything on a line that looks like code (``;``, ``{``, ``}``, ``=>``),
  and a decorator alone on its line.
- ``emoji``: pictographs, dingbats, flags, skin tones, variation selectors, zero-width joiners.
- ``special_chars``: control and zero-width characters, private-use and unassigned code points are
  removed; decoration (bullets, arrows, box drawing, other symbols) becomes a space; curly quotes and
  dashes become ASCII. Kept: letters, digits, punctuation, currency, maths, ° © ®.
- ``whitespace``: runs of spaces/tabs become one space; 3+ newlines become a paragraph break.

NFKC normalisation always runs first (full-width letters, ligatures, non-breaking spaces).
"""
from __future__ import annotations

import functools
import html
import re
import unicodedata
from typing import Callable

_HTML_ELEMENTS = (
    "a|abbr|article|aside|audio|b|blockquote|body|br|button|canvas|caption|center|cite|code|dd|del|details|"
    "div|dl|dt|em|figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|ins|kbd|"
    "label|li|link|main|mark|meta|nav|noscript|ol|option|p|pre|q|s|script|section|select|small|source|span|"
    "strike|strong|style|sub|summary|sup|svg|table|tbody|td|textarea|tfoot|th|thead|title|tr|u|ul|video"
)
# lower-case element names only: generics such as List<String>, Array<number>, Box<T> are code
_TAG = re.compile(rf"</?(?:{_HTML_ELEMENTS})(?:\s[^<>\n]*)?/?>")
_ENTITY = re.compile(r"&(?:[a-zA-Z]{2,8}|#\d{1,6}|#x[0-9a-fA-F]{1,6});")
_CREDIT = re.compile(
    r"^[ \t]*(?:"
    r"(?:photo(?:graph(?:ed)?)?|image|picture|pic|illustration|screenshot|gif|video|cover image|header image)s?"
    r"(?:[ \t]+\w+){0,2}[ \t]+(?:by|from|via|courtesy|credit|copyright)\b"
    r"|(?:photo|image|picture|illustration)s?[ \t]*(?:credit|source)s?[ \t]*[:\u2014-]"
    r"|(?-i:Photo|PHOTO|Image|IMAGE|Picture|PICTURE)s?[ \t]*[:\u00a9]"
    r"|(?:source|credit)s?[ \t]*[:\u2014]"
    r")[^\n]{0,100}$\n?",
    re.IGNORECASE | re.MULTILINE,
)
_URL_BODY = r"(?:[^\s<>\"'\u201c\u201d\u2018\u2019()\[\]{}]|\([^\s()<>]*\))*"
_LINK = (
    rf"(?:(?:https?|ftp)://|www\.){_URL_BODY}(?<![.,;:!?])"
    rf"|(?<![\w@./-])[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*\.(?:com|org|net|edu|gov|co|ly|me)(?:\.[a-z]{{2}})?/"
    rf"{_URL_BODY}(?<![.,;:!?])"
)
_URL = re.compile(rf"[ \t]*\([ \t]*(?:{_LINK})[ \t]*\)|{_LINK}")  # "(link)" goes with its brackets
_LINK_HINT = re.compile(r"://|www\.|\.(?:com|org|net|edu|gov|co|ly|me)\b")  # fast pre-check, most articles have none
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# preceded by a space, ':' or nothing; not followed by what makes it code: a call '(', a scope '/',
# an attribute '.x', a ':' (annotation docs), or more handle characters
_MENTION = re.compile(r"(?<![^\s:])@[A-Za-z0-9_](?:[A-Za-z0-9_.]*[A-Za-z0-9_])?(?![\w(/@:=-]|\.\w)")
_CODE_LINE = re.compile(r"[;{}]|=>|^\s*@[\w.]+(?:\(.*\))?\s*$")
_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\U00002600-\U000027BF\U00002B00-\U00002BFF\U0000FE00-\U0000FE0F"
    "\U0000200D\U000020E3\U000E0020-\U000E007F]"
)
_REPLACEMENTS = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"',
    "\u2013": "-", "\u2014": " - ", "\u2212": "-", "\u2026": "...", "\u00a0": " ",
    "\r": "\n", "\f": " ", "\v": " ", "\u2028": "\n", "\u2029": "\n\n",
}
_REMOVE_CATEGORIES = {"Cc", "Cf", "Co", "Cn", "Cs"}
_DECORATION = re.compile("[\u2022\u2023\u2043\u00b7\u2219\u2190-\u21ff\u2500-\u25ff\u27f0-\u27ff\u2900-\u297f]")
_KEEP_SYMBOLS = "\u00b0\u00a9\u00ae"  # ° © ®: content, although Unicode files them with decoration (So)
_NOT_PLAIN = re.compile(r"[^\t\n\x20-\x7e]")
_SPACES = re.compile(" {2,}")
_PARAGRAPHS = re.compile(r"\n{3,}")


@functools.lru_cache(maxsize=None)
def _special_char(ch: str) -> str:
    if ch in _REPLACEMENTS:
        return _REPLACEMENTS[ch]
    if _DECORATION.match(ch):
        return " "
    cat = unicodedata.category(ch)
    if cat in _REMOVE_CATEGORIES:
        return ""
    return " " if cat == "So" and ch not in _KEEP_SYMBOLS else ch


def _special_chars(text: str) -> str:
    return _NOT_PLAIN.sub(lambda m: _special_char(m.group()), text)


def _strip_html(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    text = _TAG.sub(" ", text)
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text).replace("\u00a0", " ")


def _mentions(text: str) -> str:
    if "@" not in text:
        return text
    return "\n".join(ln if _CODE_LINE.search(ln) else _MENTION.sub("", ln) for ln in text.split("\n"))


def _urls(text: str) -> str:
    return _URL.sub("", text) if _LINK_HINT.search(text) else text


def _whitespace(text: str) -> str:
    # str methods, not regexes: a 10 MB article is one long run of matches
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for ch in "\t\f\v":
        if ch in text:
            text = text.replace(ch, " ")
    if "  " in text:
        text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip(" ") for line in text.split("\n"))
    return _PARAGRAPHS.sub("\n\n", text).strip()


RULES: dict[str, Callable[[str], str]] = {
    "html": _strip_html,
    "image_credits": lambda t: _CREDIT.sub("", t),
    "urls": _urls,
    "emails": lambda t: _EMAIL.sub("", t) if "@" in t else t,
    "mentions": _mentions,
    "emoji": lambda t: _EMOJI.sub("", t),
    "special_chars": _special_chars,
    "whitespace": _whitespace,
}


def check_rules(names: list[str]) -> list[str]:
    return [f"data.clean_rules: unknown rule {n!r} (known: {', '.join(RULES)})" for n in names if n not in RULES]


def clean_text(text: str, rules: list[str], counts: dict[str, int] | None = None,
               removed: dict[str, int] | None = None) -> str:
    """Apply ``rules`` in order; ``counts[rule]`` += 1 for each rule that changed the text and
    ``removed[rule]`` += the characters it took away."""
    text = unicodedata.normalize("NFKC", text)
    for name in rules:
        new = RULES[name](text)
        if new != text:
            if counts is not None:
                counts[name] = counts.get(name, 0) + 1
            if removed is not None:
                removed[name] = removed.get(name, 0) + max(0, len(text) - len(new))
        text = new
    return text


def normalise_for_dedup(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form used for duplicate detection."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())
