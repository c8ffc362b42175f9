"""Each cleaning rule on crafted strings: what it removes and what it must keep."""
import pytest

from medgen.data.clean import RULES, clean_text, normalise_for_dedup

ALL = list(RULES)


@pytest.mark.parametrize("rule,dirty,clean", [
    ("urls", "see https://example.com/a?b=1 and www.test.org/x now", "see and now"),
    ("urls", "docs at github.com/user/repo today", "docs at today"),
    ("emails", "write to jane.doe+news@mail.example.co.uk please", "write to please"),
    ("mentions", "thanks @jdoe_writes and @a.b!", "thanks and !"),
    ("emoji", "great job \U0001F680\U0001F525 team \u2764\ufe0f", "great job team"),
    ("html", "one<br>two <p class='x'>three</p> &amp; four&nbsp;five", "one two three & four five"),
    ("image_credits", "Intro.\nPhoto by Ana Ruiz on Unsplash\nBody.", "Intro.\nBody."),
    ("image_credits", "Intro.\n  Image by someone from Pixabay\nBody.", "Intro.\nBody."),
    ("special_chars", "a\u200bb \u2022 item \u2192 next \u201cquoted\u201d \u2014 dash", "ab item next \"quoted\" - dash"),
    ("whitespace", "a    b\t\tc\n\n\n\n\nd  ", "a b c\n\nd"),
    ("html", "three</p> and<br/>four <a href=\"x\">link</a>", "three and four link"),
    ("urls", "visit https://guild.ai. Then", "visit . Then"),
    ("urls", "from \u201cwww.kaggle.com\u201d, then", "from \u201c\u201d, then"),
    ("urls", "code on GitHub (github.com/a/b).", "code on GitHub."),
    ("urls", "see https://en.wikipedia.org/wiki/Python_(language) now", "see now"),
    ("mentions", "Follow @jdoe. Thanks @a_b!", "Follow . Thanks !"),
    ("mentions", "Twitter:@atlaspio", "Twitter:"),
    ("image_credits", "A\nPhoto: Sam Wasson/Getty Images\nB", "A\nB"),
    ("image_credits", "A\nImage courtesy of NASA\nB", "A\nB"),
    ("image_credits", "A\nPhoto \u00a9 iStockphoto.com/someone\nB", "A\nB"),
    ("image_credits", "A\nSource: The Motley Fool\nB", "A\nB"),
    ("image_credits", "A\nCredit: Pixabay\nB", "A\nB"),
    ("image_credits", "A\nIllustration and design by Josh H.\nB", "A\nB"),
    ("emoji", "flag \U0001F1EB\U0001F1F7 wave \U0001F44B\U0001F3FD family \U0001F468\u200d\U0001F469\u200d\U0001F467!", "flag wave family !"),
    ("special_chars", "bell\x07 nul\x00 pua\ue000 bom\ufeff", "bell nul pua bom"),
    ("special_chars", "a\rb\u2028c", "a\nb\nc"),
])
def test_rule(rule, dirty, clean):
    assert clean_text(dirty, [rule, "whitespace"]) == clean


def test_rules_keep_ordinary_text_and_paragraphs():
    text = "Python 3.12 costs $0 and 100% of it is fun: e.g. lists, dicts.\n\nSecond paragraph (with notes)."
    assert clean_text(text, ALL) == text


def test_email_is_not_left_half_as_a_mention():
    assert clean_text("mail me: bob@example.com", ALL) == "mail me:"


def test_nfkc_normalisation_runs_first():
    assert clean_text("\ufb01le \uff21\uff22", ["whitespace"]) == "file AB"


def test_counts_only_rules_that_changed_something():
    counts = {}
    clean_text("hello @you see https://x.io/y", ALL, counts)
    assert counts == {"urls": 1, "mentions": 1, "whitespace": 1}


def test_dedup_normal_form_ignores_case_punctuation_and_spacing():
    assert normalise_for_dedup("Hello,   World!\n\nBye.") == normalise_for_dedup("hello world bye")


# ---------------------------------------------------------------- what each rule must keep (docs/data.md)

@pytest.mark.parametrize("rule,text", [
    ("html", "val xs: List<String> = listOf(); const a: Array<number> = []; fn<T>(x: T)"),
    ("html", "author = '<first> <last>'"),
    ("html", "<div pic-canvas\nclass=\"circles\">"),  # a tag broken over lines is code, not a remnant
    ("urls", "apiVersion: networking.k8s.io/v1beta1"),
    ("urls", "Python 3.12 costs $0.99, pi=3.14159, 1,000.50 and v2.0.1 (e.g. config.yaml)"),
    ("emails", "x = a@b.T and w@v"),
    ("mentions", "import { NgModule } from '@angular/core';"),
    ("mentions", "@Override"),
    ("mentions", "@app.route(\"/\")"),
    ("mentions", "private @Id @GeneratedValue long id;"),
    ("mentions", "@Entity: this annotation maps the class"),
    ("mentions", "use \"@media\" queries and install @types/node"),
    ("mentions", "ssh git@github and user@localhost"),
    ("image_credits", "Images from the Hubble telescope changed how we think about the age of the universe, and "
                      "this paragraph is far too long to be a credit line."),
    ("image_credits", "image: docker.io/library/nginx:latest"),
    ("image_credits", "Source code is on the next page."),
    ("special_chars", "25°C, © 2020 ACME®, ±3, ≤ 5, 5 × 3, €10, café, naïve, 東京"),
])
def test_rule_keeps(rule, text):
    assert clean_text(text, [rule]) == text


def test_removed_chars_are_counted_per_rule():
    counts, removed = {}, {}
    clean_text("hi @you see https://x.io/y", ALL, counts, removed)
    assert removed == {"urls": len("https://x.io/y"), "mentions": len("@you"), "whitespace": 2}


# ---------------------------------------------------------------- the real sample: no damage to code or numbers

def _real_texts(path):
    import csv
    import sys

    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def test_cleaner_does_not_damage_code_or_numbers_on_real_articles(medium_sample):
    import re
    from collections import Counter

    decimals, generics = re.compile(r"\d+\.\d+"), re.compile(r"\w<\w+>")
    code_at = re.compile(r"@\w+(?=[(/])|['\"]@[\w/-]+")  # decorators with arguments, npm scopes
    for text in _real_texts(medium_sample):
        cleaned = clean_text(text, ALL)
        assert clean_text(cleaned, ALL) == cleaned  # idempotent
        # only the rules that remove whole links/lines may take numbers with them
        assert decimals.findall(clean_text(text, ["urls", "emails", "image_credits"])) == decimals.findall(cleaned)
        assert not Counter(generics.findall(text)) - Counter(generics.findall(cleaned))
        assert not Counter(code_at.findall(text)) - Counter(code_at.findall(cleaned))
        nfkc = clean_text(text, [])
        credit_lines = set(nfkc.splitlines()) - set(clean_text(text, ["image_credits"]).splitlines())
        assert all(len(line) <= 120 for line in credit_lines), credit_lines


def _doc_examples():
    import re

    from tests.helpers import ROOT

    doc = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    block = doc.split("```clean-examples\n", 1)[1].split("```", 1)[0]
    unescape = lambda s: re.sub(  # noqa: E731
        r"\\(n|t|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})",
        lambda m: {"n": "\n", "t": "\t"}.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), s)
    for line in block.splitlines():
        rule, _, rest = line.partition(": ")
        dirty, _, clean = rest.partition("  =>  ")
        yield rule, unescape(dirty), unescape(clean)


@pytest.mark.parametrize("rule,dirty,clean", list(_doc_examples()))
def test_docs_examples_hold(rule, dirty, clean):
    assert clean_text(dirty, [rule, "whitespace"]) == clean
