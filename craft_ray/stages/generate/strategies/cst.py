"""``generate.strategy: cst`` — AugCon's Context-Split-Tree.

Per document: ask one question about the whole context, cut the context in two (at the
sentence boundary nearest its middle, or the nearest whitespace token), recurse, until a
piece is shorter than ``min_chars`` or ``max_depth`` is reached (:func:`split_tree`). Every
node gets one question (step ``cst_questions``); the questions are scored, duplicates and the
weakest dropped (:func:`select_questions`); the kept ones are answered from their node's
context, self-aligned to the few-shot QA pairs (step ``cst_answers``).

The scorer. AugCon trains a (context, question) bi-encoder contrastively with in-batch
negatives; until craft_ray has that trainer (the retriever-training issue), the score is the
cosine similarity of question and context under an off-the-shelf bi-encoder (the offline
all-MiniLM-L6-v2 by default, ``cst.scorer_model``), as the issue allows. It runs in the driver
on the generated questions (a few thousand short texts).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from craft_ray.stages.generate.strategies.common import (
    Item,
    StepContext,
    final_results,
    obj_schema,
    prompt_row,
    run_step,
    sentence_cuts,
    shorten,
    text_prop,
    token_cuts,
)

QUESTION_INSTRUCTION = (
    "Please carefully read the context below. Then ask exactly one question that the context "
    "answers, at the level of detail of the whole context. Return the output only as a JSON "
    'structure in this format: {"question": "<question here>"}')
ANSWER_INSTRUCTION = (
    "Please carefully read the context below, then answer the question using only the "
    'context. Return the output only as a JSON structure in this format: '
    '{"answer": "<answer here>"}')
QUESTION_SCHEMA = obj_schema({"question": text_prop(8)})
ANSWER_SCHEMA = obj_schema({"answer": text_prop(1)})

REJECT_LOW_SCORE = "Below the scorer's kept fraction."
REJECT_DUPLICATE = "Duplicate question."


@dataclass(frozen=True)
class Node:
    """A node of the tree: ``text[start:end]`` (whitespace-trimmed) at ``depth``."""

    node_id: str
    parent_id: str
    depth: int
    start: int
    end: int


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_point(text: str, start: int, end: int, split_by: str = "sentences") -> int | None:
    """Where ``text[start:end]`` is cut in two: the boundary nearest its middle (absolute
    offset), or None when it has no inner boundary."""
    piece = text[start:end]
    cuts = sentence_cuts(piece) if split_by == "sentences" else []
    cuts = cuts or token_cuts(piece)
    if not cuts:
        return None
    mid = len(piece) / 2
    return start + min(cuts, key=lambda c: (abs(c - mid), c))


def split_tree(text: str, min_chars: int, max_depth: int, split_by: str = "sentences",
               root_id: str = "r") -> list[Node]:
    """Every node of the Context-Split-Tree of ``text`` in breadth-first order.

    A piece shorter than ``min_chars`` is not a node (nothing to ask about); a node at
    ``max_depth`` or without an inner boundary is a leaf. Children ids append ``0``/``1`` to
    the parent's id, so an id says the node's path.
    """
    out: list[Node] = []
    start, end = _trim(text, 0, len(text))
    queue = [(root_id, "", 0, start, end)]
    while queue:
        nid, parent, depth, s, e = queue.pop(0)
        if e - s < min_chars:
            continue
        out.append(Node(nid, parent, depth, s, e))
        if depth >= max_depth:
            continue
        cut = split_point(text, s, e, split_by)
        if cut is None:
            continue
        for i, (a, b) in enumerate(((s, cut), (cut, e))):
            a, b = _trim(text, a, b)
            queue.append((f"{nid}{i}", nid, depth + 1, a, b))
    return out


def _norm(q: str) -> str:
    return re.sub(r"[\W_]+", " ", q.lower()).strip()


def select_questions(questions: Sequence[str], scores: Sequence[float], qvecs: np.ndarray,
                     keep_fraction: float, dedup_threshold: float) -> list[str]:
    """Per question: "" (kept) or the reason it is dropped.

    Best score first; a question equal (after normalising case and punctuation) or too similar
    (cosine >= ``dedup_threshold``) to a kept one is a duplicate; of the rest, the best
    ``ceil(keep_fraction * n)`` are kept.
    """
    n = len(questions)
    n_keep = math.ceil(keep_fraction * n)
    out = [""] * n
    kept: list[int] = []
    seen: set[str] = set()
    for i in sorted(range(n), key=lambda j: (-scores[j], j)):
        key = _norm(questions[i])
        dup = key in seen or any(float(qvecs[i] @ qvecs[j]) >= dedup_threshold for j in kept)
        if dup:
            out[i] = REJECT_DUPLICATE
        elif len(kept) >= n_keep:
            out[i] = REJECT_LOW_SCORE
        else:
            kept.append(i)
            seen.add(key)
    return out


def _messages(ctx: StepContext, shots: list[Any], instruction: str, user: str,
              answer_key: str) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    for s in shots:
        body = f"Context: {ctx.shot_text(s)}"
        if answer_key == "answer":
            body += f"\n\nQuestion: {s.instruction.strip()}"
        msgs.append({"role": "user", "content": f"{instruction}\n\n{body}"})
        value = s.output if answer_key == "answer" else s.instruction
        msgs.append({"role": "assistant",
                     "content": json.dumps({answer_key: value.strip()}, ensure_ascii=False)})
    msgs.append({"role": "user", "content": f"{instruction}\n\n{user}"})
    return msgs


def run_cst(ctx: StepContext, docs: list[dict[str, Any]], scfg: Any) -> tuple[list[Item],
                                                                              dict[str, Any]]:
    """All CST items (clean or rejected) and strategy stats. Ray must be initialised."""
    max_new = ctx.cfg.max_new_tokens or 128
    items, nodes, q_rows = _question_prompts(ctx, docs, scfg, max_new)
    by_id = {it.sample_id: it for it in items}
    qs = run_step(ctx, "cst_questions", q_rows, QUESTION_SCHEMA)
    asked = []
    for sid, res in qs.items():
        if res["obj"] is None:
            by_id[sid].reject("cst_questions", res["reason"], res["detail"], res["text"])
        else:
            asked.append(sid)
    asked.sort()
    scores = _score_questions(asked, qs, nodes, by_id, scfg)
    a_rows = _answer_prompts(ctx, asked, qs, nodes, by_id,
                             scfg.answer_max_new_tokens or max_new)
    ans = run_step(ctx, "cst_answers", a_rows, ANSWER_SCHEMA)
    for sid, it, res in final_results(ans, by_id, "cst_answers"):
        node, context = nodes[sid]
        it.record = {"question": qs[sid]["obj"]["question"], "answer": res["obj"]["answer"],
                     "context": context, "depth": node.depth, "span_start": node.start,
                     "span_end": node.end, "node_id": node.node_id,
                     "parent_id": node.parent_id, "score": scores[sid]}
    depth_counts: dict[int, int] = {}
    for node, _ in nodes.values():
        depth_counts[node.depth] = depth_counts.get(node.depth, 0) + 1
    return items, {"nodes": len(nodes), "nodes_per_depth": depth_counts,
                   "questions_scored": len(asked), "scorer": scfg.scorer_model}


def _question_prompts(ctx: StepContext, docs: list[dict[str, Any]], scfg: Any, max_new: int
                      ) -> tuple[list[Item], dict[str, tuple[Node, str]], list[dict[str, Any]]]:
    """One item per node of every document's tree, its (node, context) by sample id, and
    the prompts asking for each node's question."""
    items: list[Item] = []
    nodes: dict[str, tuple[Node, str]] = {}
    q_rows = []
    for doc in docs:
        text = shorten(doc["text"], scfg.max_context_chars)
        for node in split_tree(text, scfg.min_chars, scfg.max_depth, scfg.split_by,
                               root_id=f"{doc['doc_id']}#cst:r"):
            context = text[node.start:node.end]
            shots = ctx.draw_shots(node.node_id)
            it = Item(node.node_id, doc["doc_id"], doc["corpus"], [s.id for s in shots],
                      doc["fewshot_ids"])
            items.append(it)
            nodes[it.sample_id] = (node, context)
            q_rows.append(prompt_row(ctx, it.sample_id, _messages(
                ctx, shots, QUESTION_INSTRUCTION, f"Context: {context}", "question"),
                QUESTION_SCHEMA, max_new))
    return items, nodes, q_rows


def _score_questions(asked: list[str], qs: dict[str, Any], nodes: dict[str, tuple[Node, str]],
                     by_id: dict[str, Item], scfg: Any) -> dict[str, float]:
    """Score each asked question against its context; reject duplicates and the weakest
    (step ``cst_score``). Returns the scores by sample id."""
    from craft_ray.stages.generate.strategies.common import Embedder

    scores: dict[str, float] = {}
    if asked:
        embed = Embedder(scfg.scorer_model)
        qtexts = [qs[s]["obj"]["question"] for s in asked]
        qv, cv = embed(qtexts), embed([nodes[s][1] for s in asked])
        sims = (qv * cv).sum(axis=1)
        scores = {s: round(float(v), 4) for s, v in zip(asked, sims)}
        verdicts = select_questions(qtexts, list(sims), qv, scfg.keep_fraction,
                                    scfg.dedup_threshold)
        for s, v in zip(asked, verdicts):
            if v:
                by_id[s].reject("cst_score", v, f"score {scores[s]}", qs[s]["obj"]["question"])
    return scores


def _answer_prompts(ctx: StepContext, asked: list[str], qs: dict[str, Any],
                    nodes: dict[str, tuple[Node, str]], by_id: dict[str, Item], max_new: int
                    ) -> list[dict[str, Any]]:
    """The prompts answering each kept question from its node's context, with the item's
    own few-shots."""
    a_rows = []
    for sid in asked:
        it = by_id[sid]
        if it.reject_reason:
            continue
        shots = [s for s in ctx.shots if s.id in set(it.fewshot_ids)]
        user = f"Context: {nodes[sid][1]}\n\nQuestion: {qs[sid]['obj']['question']}"
        a_rows.append(prompt_row(ctx, sid, _messages(ctx, shots, ANSWER_INSTRUCTION, user,
                                                     "answer"),
                                 ANSWER_SCHEMA, max_new))
    return a_rows


def record_types() -> Any:
    import pyarrow as pa

    return [("question", pa.string()), ("answer", pa.string()), ("context", pa.string()),
            ("depth", pa.int64()), ("span_start", pa.int64()), ("span_end", pa.int64()),
            ("node_id", pa.string()), ("parent_id", pa.string()), ("score", pa.float64())]
