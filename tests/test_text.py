"""pre_caption: official BLIP caption normalisation."""

import pytest

from blip_fast.text import pre_caption


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A Man Riding a Wave.", "a man riding a wave"),
        ("  leading and trailing spaces  ", "leading and trailing spaces"),
        ("punctuation runs...!!! (really) *yes*", "punctuation runs really yes"),
        ('quote "this" #tag: a;b~c', "quote this tag a b c"),
        # commas, apostrophes, question marks, hyphens and slashes are kept
        ("a man's dog, isn't it? well-known 1/2", "a man's dog, isn't it? well-known 1/2"),
        # whitespace runs of 2+ (any kind) collapse to one space; a lone tab or newline stays
        ("a\t\tb  c\n\nd", "a b c d"),
        ("a\tb", "a\tb"),
        ("trailing newline\n", "trailing newline"),
        ("ends with a dot.\n", "ends with a dot"),
        ("...", ""),
        ("", ""),
        ("ÉCOLE Café", "école café"),
    ],
)
def test_normalisation(caption, expected):
    assert pre_caption(caption) == expected


def test_truncates_to_max_words():
    words = [f"w{i}" for i in range(70)]
    assert pre_caption(" ".join(words)) == " ".join(words[:50])
    assert pre_caption(" ".join(words), max_words=30) == " ".join(words[:30])
    assert pre_caption(" ".join(words[:30]), max_words=30) == " ".join(words[:30])


def test_truncation_counts_after_normalisation():
    # "a . b" -> "a b": the removed dot is not a word; a lone tab is not a word separator
    assert pre_caption("a . b . c . d", max_words=3) == "a b c"
    assert pre_caption("a\tb c d", max_words=2) == "a\tb c"
