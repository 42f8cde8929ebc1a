"""StackExchange ``Posts.xml`` dumps as corpus documents: one document per question (title,
body and its chosen answer as plain text), ids ``{corpus}/{site}/Posts.xml#{row}`` like every
corpus reader's (:mod:`craft_ray.store.corpus`), rejects with their reason."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

from craft_ray.store.corpus import (
    CorpusConfig,
    CorpusError,
    Shard,
    bounded,
    open_binary,
    record,
)

_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "pre", "blockquote", "h1", "h2", "h3", "h4",
               "h5", "h6", "tr", "table", "hr"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


_WS = re.compile(r"[ \t\r\f\v]+")
_NL = re.compile(r"\n\s*\n+")


def html_to_text(markup: str) -> str:
    """Strip HTML to readable text: block tags become line breaks, entities are decoded."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts))
    text = "\n".join(_WS.sub(" ", line).strip() for line in text.split("\n"))
    return _NL.sub("\n\n", text).strip()


def iter_posts(path: str) -> Iterator[tuple[int, dict[str, str]]]:
    import xml.etree.ElementTree as ET

    idx = -1
    try:
        with open_binary(path) as fh:
            for _event, elem in ET.iterparse(fh, events=("end",)):
                if elem.tag == "row":
                    idx += 1
                    yield idx, dict(elem.attrib)
                    elem.clear()
    except ET.ParseError as exc:
        raise CorpusError(f"{path} is not a readable StackExchange Posts.xml: {exc}") from exc


def read_stackexchange_shard(shard: Shard, cfg: CorpusConfig) -> Iterator[dict[str, Any]]:
    """A StackExchange ``Posts.xml``: one document per question.

    Document = title + question body + accepted answer (else the top-voted answer), HTML
    stripped, as CRAFT built its StackExchange corpus. Two streaming passes: the first keeps
    only integers (which answer belongs to which question), the second emits each question as
    soon as its chosen answer has been seen, so memory holds only questions waiting for an
    answer further down the file. ``row`` is the question's ``<row>`` element number.
    """
    accepted, chosen = _chosen_answers(shard.path)
    answer_to_q = {aid: qid for qid, aid in chosen.items()}
    site = shard.shard.split("/")[0]
    waiting: dict[str, tuple[int, dict[str, str]]] = {}
    early: dict[str, dict[str, str]] = {}  # chosen answers met before their question

    def emit(row: int, q: dict[str, str], answer: dict[str, str] | None) -> dict[str, Any]:
        return _question_record(shard, cfg, site, accepted, row, q, answer)

    for idx, a in iter_posts(shard.path):
        ptype = a.get("PostTypeId")
        if ptype == "1":
            if "Id" not in a:
                yield record(shard, idx, None, {}, "malformed_post", "question without Id",
                              json.dumps(a))
                continue
            if a["Id"] in early:
                yield emit(idx, a, early.pop(a["Id"]))
            elif a["Id"] in chosen:
                waiting[a["Id"]] = (idx, a)
            else:
                yield emit(idx, a, None)
        elif ptype == "2" and a.get("Id") in answer_to_q:
            qid = answer_to_q[a["Id"]]
            if qid in waiting:
                row, q = waiting.pop(qid)
                yield emit(row, q, a)
            else:
                early[qid] = a
    # Questions whose chosen answer is missing from the file.
    for row, q in sorted(waiting.values(), key=lambda t: t[0]):
        yield emit(row, q, None)


def _chosen_answers(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """The first pass: accepted answer ids by question id, and the chosen answer of every
    question that has one (the accepted one, else the top-voted)."""
    accepted: dict[str, str] = {}
    best: dict[str, tuple[int, str]] = {}
    for _idx, a in iter_posts(path):
        if a.get("PostTypeId") == "1" and a.get("AcceptedAnswerId"):
            accepted[a["Id"]] = a["AcceptedAnswerId"]
        elif a.get("PostTypeId") == "2" and a.get("ParentId"):
            try:
                score = int(a.get("Score", "0"))
            except ValueError:
                score = 0
            cur = best.get(a["ParentId"])
            # Ties go to the earlier answer, so the choice is deterministic.
            if cur is None or score > cur[0]:
                best[a["ParentId"]] = (score, a["Id"])
    chosen: dict[str, str] = {}
    for qid in set(accepted) | set(best):
        if qid in accepted:
            chosen[qid] = accepted[qid]
        else:
            chosen[qid] = best[qid][1]
    return accepted, chosen


def _question_record(shard: Shard, cfg: CorpusConfig, site: str, accepted: dict[str, str],
                     row: int, q: dict[str, str], answer: dict[str, str] | None
                     ) -> dict[str, Any]:
    """One question's document: title, body and ``answer``'s body, with the post's metadata."""
    meta = {"post_id": q.get("Id"), "site": site, "tags": q.get("Tags", ""),
            "score": q.get("Score"), "answer_id": answer.get("Id") if answer else None,
            "answer_accepted": bool(answer and accepted.get(q["Id"]) == answer.get("Id"))}
    title = (q.get("Title") or "").strip()
    parts = [title, html_to_text(q.get("Body", ""))]
    if answer is not None:
        parts.append(html_to_text(answer.get("Body", "")))
    text = "\n\n".join(p for p in parts if p)
    return bounded(shard, row, text, meta, cfg)
