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
