"""StackExchange bodies to plain text (the dumps' readers are tested through
:func:`craft_ray.store.corpus.read_shard` in ``test_corpus.py``)."""

from __future__ import annotations

from craft_ray.store.stackexchange import html_to_text


def test_html_to_text():
    assert html_to_text("<p>a &amp; b</p><p>c<br>d</p>") == "a & b\n\nc\nd"
