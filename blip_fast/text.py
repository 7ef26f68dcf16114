"""Caption and question normalisation, identical to official BLIP's ``pre_caption`` and
``pre_question``."""

import re

__all__ = ["pre_caption", "pre_question"]

# The official character class: these become spaces (captions) or vanish (questions); every
# other character is kept (commas, apostrophes, question marks, hyphens and slashes survive).
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Lower-case, blank out ``. ! " ( ) * # : ; ~``, collapse whitespace runs, strip, and keep
    the first ``max_words`` words (30 for the retrieval datasets, 50 by default).

    Step for step the official function, including its quirks: only runs of two or more
    whitespace characters are collapsed (a lone tab or newline stays), and words are split on
    ``' '`` alone.
    """
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """Lower-case, delete ``. ! " ( ) * # : ; ~`` (no space in their place), strip trailing
    spaces and keep the first ``max_words`` words, as official VQA: unlike ``pre_caption``,
    leading and inner runs of spaces stay, and ``?``, ``,`` and ``'`` are kept."""
    question = _PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question
