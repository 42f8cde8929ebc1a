"""Quality guards: what a real (small) model gets wrong while its JSON stays valid.

Each guard raises :class:`TaskValidationError` with a fixed message, so rejects are counted by
reason in ``stats.json`` and the report. The built-in tasks call them from ``validate`` (options,
question) and ``check_source`` (no verbatim copy of the source document).
"""

from __future__ import annotations

import re

from craft_ray.tasks.base import LETTERS, TaskValidationError

MIN_OPTION_CHARS = 2  # "IgA", "5 mg" are real options; "A", "M" are not

OPTION_ONLY_LETTER = "Option is only a letter label."
OPTION_TOO_SHORT = "Option shorter than {n} characters."
DUPLICATE_OPTIONS = "Duplicate answer options."
NEAR_DUPLICATE_OPTIONS = "Answer options that differ only in filler words."
QUESTION_CUT_OFF = "Question cut off (no terminal punctuation)."
QUESTION_REPEATS_OPTION = "Question repeats an answer option."
COPIES_DOCUMENT = "{what} copies the document verbatim."

_TERMINAL = tuple("?.!:)\"'\u201d")
_WORDS = re.compile(r"\w+")
# Words whose presence does not make two options different answers ("some people do use X"
# vs "some people use X"); a changed content word ("increased" vs "decreased") does.
FILLER_WORDS = frozenset(
    "a an the of to in on at for and or is are was were be been do does did that this it "
    "its there their".split())
# Words that make a term a question ("what does X mean?") without adding content to it.
QUESTION_WORDS = frozenset(
    "what which who whom whose where when why how mean means meaning called".split())


def check_options(texts: list[str], min_chars: int = MIN_OPTION_CHARS) -> None:
    """Reject option texts (labels removed, lower-cased) that are only a letter, shorter than
    ``min_chars``, duplicated (compared word by word, punctuation ignored) or the same once
    :data:`FILLER_WORDS` are dropped."""
    for t in texts:
        if len(t) == 1 and t.upper() in LETTERS:
            raise TaskValidationError(OPTION_ONLY_LETTER)
        if len(t) < min_chars:
            raise TaskValidationError(OPTION_TOO_SHORT.format(n=min_chars))
    words = [_WORDS.findall(t.lower()) for t in texts]
    norm = [" ".join(w) for w in words]
    if len(set(norm)) < len(norm):
        raise TaskValidationError(DUPLICATE_OPTIONS)
    content = [" ".join(x for x in w if x not in FILLER_WORDS) for w in words]
    if len(set(content)) < len(content):
        raise TaskValidationError(NEAR_DUPLICATE_OPTIONS)


def _content_words(text: str) -> list[str]:
    return [w for w in _WORDS.findall(text.lower())
            if w not in FILLER_WORDS and w not in QUESTION_WORDS]


def check_question(question: str, labelled: list[str], texts: list[str]) -> None:
    """Reject a question that stops without terminal punctuation, lists two or more of the
    labelled options (``"A. ..."``) or is one option's text once filler and question words are
    dropped ("What is a heracleum?" with option "Heracleum"; no question of the 1,273 MedQA
    test or 1,221 CommonsenseQA dev items does that)."""
    if not question.rstrip().endswith(_TERMINAL):
        raise TaskValidationError(QUESTION_CUT_OFF)
    q = question.lower()
    inline = sum(1 for o in labelled if o.lower() in q)
    words = _content_words(question)
    if inline >= 2 or any(words and _content_words(t) == words for t in texts):
        raise TaskValidationError(QUESTION_REPEATS_OPTION)


def copied_fraction(text: str, source: str, n: int = 8) -> float:
    """Share of ``text``'s word ``n``-grams that occur verbatim in ``source`` (0 if too short).

    Lower-cased words, punctuation ignored: a copy with changed spacing or quotes still counts.
    """
    words = _WORDS.findall(text.lower())
    if len(words) < n:
        return 0.0
    src = _WORDS.findall(source.lower())
    src_grams = {tuple(src[i:i + n]) for i in range(len(src) - n + 1)}
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return sum(g in src_grams for g in grams) / len(grams)


def check_not_copied(what: str, text: str, source: str, max_fraction: float) -> None:
    """Reject ``text`` when more than ``max_fraction`` of it is copied from ``source``."""
    if source and copied_fraction(text, source) > max_fraction:
        raise TaskValidationError(COPIES_DOCUMENT.format(what=what))
