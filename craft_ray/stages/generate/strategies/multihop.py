"""``generate.strategy: multihop`` — qa-expert's multi-hop items over neighbouring documents.

1. Pairs: the retrieved documents' vectors are read back from the embedding store the
   retrieve stage searched; two documents pair when they are close (sharing a topic) but not
   near-duplicates, most similar pairs first, each document in one pair at most
   (:func:`pair_documents`).
2. ``multihop_decompose``: from both paragraphs, one question that needs both, and one single
   question per paragraph.
3. ``multihop_answers``: each single question answered from its own paragraph (greedy by
   default: qa-expert regenerates long answers at temperature 0 against hallucination),
   self-aligned to the few-shots. For a seeded ``unanswerable_fraction`` of the pairs, the
   second paragraph is swapped for the document least similar to the first
   (:func:`pick_distractor`): that sub-question is marked ``unanswerable``.
4. ``multihop_final``: the thought combining the single answers and the final answer.

Records follow qa-expert's layout (``question``, ``final_answer``, ``sub_questions`` with
``question``, ``paragraph``, ``long_answer``, ``unanswerable``) plus ``thought`` and the
``doc_ids`` they came from; only outputs that follow each step's schema are kept.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np

from craft_ray.stages.generate.strategies.common import (
    Item,
    StepContext,
    final_results,
    obj_schema,
    prompt_row,
    run_step,
    shorten,
    store_path,
    store_vectors,
    text_prop,
)

DECOMPOSE_INSTRUCTION = (
    "Please carefully read the two paragraphs below. Write one question that can only be "
    "answered by combining information from both paragraphs, then split it into exactly two "
    "single questions: the first answered by paragraph 1, the second by paragraph 2. Return the "
    'output only as a JSON structure in this format: {"question": "<multi-hop question>", '
    '"sub_questions": ["<question on paragraph 1>", "<question on paragraph 2>"]}')
ANSWER_INSTRUCTION = (
    "Please carefully read the paragraph below, then answer the question with a complete "
    "sentence using only the paragraph. If the paragraph does not contain the answer, say that "
    'it cannot be answered from it. Return the output only as a JSON structure in this format: '
    '{"long_answer": "<answer here>"}')
FINAL_INSTRUCTION = (
    "Below are a question, the single questions it was split into and their answers. Write "
    "your thought combining the answers, then the final answer to the question (say so if a "
    'single answer is missing). Return the output only as a JSON structure in this format: '
    '{"thought": "<reasoning here>", "final_answer": "<final answer here>"}')
DECOMPOSE_SCHEMA = obj_schema({
    "question": text_prop(8),
    "sub_questions": {"type": "array", "items": text_prop(8), "minItems": 2, "maxItems": 2},
})
ANSWER_SCHEMA = obj_schema({"long_answer": text_prop(1)})
FINAL_SCHEMA = obj_schema({"thought": text_prop(1), "final_answer": text_prop(1)})


def pair_documents(vecs: np.ndarray, min_similarity: float, max_similarity: float,
                   max_pairs: int | None = None) -> list[tuple[int, int, float]]:
    """Disjoint pairs ``(i, j, cosine)`` with ``i < j``, most similar first.

    Only pairs with ``min_similarity <= cosine < max_similarity`` qualify (neighbours on a
    topic, not near-duplicates); each row is used at most once (greedy matching).
    """
    n = len(vecs)
    if n < 2:
        return []
    sims = vecs @ vecs.T
    iu, ju = np.triu_indices(n, k=1)
    s = sims[iu, ju]
    ok = (s >= min_similarity) & (s < max_similarity)
    order = sorted(zip(-s[ok], iu[ok], ju[ok]))  # ties broken by index: deterministic
    used: set[int] = set()
    pairs: list[tuple[int, int, float]] = []
    for neg, i, j in order:
        if i in used or j in used:
            continue
        used.update((int(i), int(j)))
        pairs.append((int(i), int(j), round(float(-neg), 4)))
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
    return pairs


def pick_distractor(vecs: np.ndarray, i: int, exclude: set[int]) -> int | None:
    """The row least similar to row ``i`` outside ``exclude`` (None when there is none)."""
    sims = vecs @ vecs[i]
    cands = [k for k in np.argsort(sims, kind="stable") if int(k) not in exclude]
    return int(cands[0]) if cands else None


def is_unanswerable(seed: int, key: str, fraction: float) -> bool:
    """Seeded draw: does this pair become an unanswerable item (rerun-stable)?"""
    return random.Random(f"{seed}:unanswerable:{key}").random() < fraction


def _answer_messages(ctx: StepContext, shots: list[Any], paragraph: str, question: str
                     ) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    for s in shots:
        msgs.append({"role": "user", "content": f"{ANSWER_INSTRUCTION}\n\nParagraph: "
                     f"{ctx.shot_text(s)}\n\nQuestion: {s.instruction.strip()}"})
        msgs.append({"role": "assistant", "content": json.dumps(
            {"long_answer": s.output.strip()}, ensure_ascii=False)})
    msgs.append({"role": "user", "content": f"{ANSWER_INSTRUCTION}\n\nParagraph: {paragraph}"
                 f"\n\nQuestion: {question}"})
    return msgs


def run_multihop(ctx: StepContext, docs: list[dict[str, Any]], scfg: Any, run_dir: str
                 ) -> tuple[list[Item], dict[str, Any]]:
    """All multi-hop items (clean or rejected) and strategy stats. Ray must be initialised."""
    docs = [d for d in docs if d["text"].strip()]
    vecs = store_vectors(store_path(scfg.store, run_dir), [d["doc_id"] for d in docs])
    pairs = pair_documents(vecs, scfg.min_similarity, scfg.max_similarity, scfg.max_pairs)
    max_new = ctx.cfg.max_new_tokens or 256
    items, info, d_rows = _pair_items(ctx, docs, vecs, pairs, scfg, max_new)
    by_id = {it.sample_id: it for it in items}
    dec = run_step(ctx, "multihop_decompose", d_rows, DECOMPOSE_SCHEMA)
    a_rows = _answer_rows(ctx, dec, info, by_id, max_new)
    greedy = {**ctx.sampling, "temperature": scfg.long_answer_temperature}
    ans = run_step(ctx, "multihop_answers", a_rows, ANSWER_SCHEMA, sampling=greedy)
    f_rows = _final_rows(ctx, dec, ans, info, by_id, max_new)
    fin = run_step(ctx, "multihop_final", f_rows, FINAL_SCHEMA)
    for sid, it, res in final_results(fin, by_id, "multihop_final"):
        it.record = {"question": dec[sid]["obj"]["question"],
                     "final_answer": res["obj"]["final_answer"],
                     "thought": res["obj"]["thought"], "sub_questions": info[sid]["subs"],
                     "doc_ids": info[sid]["doc_ids"]}
    return items, {"documents": len(docs), "pairs": len(pairs),
                   "unanswerable_items": sum(1 for v in info.values() if v["unans"])}


def _pair_items(ctx: StepContext, docs: list[dict[str, Any]], vecs: np.ndarray,
                pairs: list[tuple[int, int, float]], scfg: Any, max_new: int
                ) -> tuple[list[Item], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """One item per pair, what later steps need of it by sample id (paragraphs, the ones
    shown to the answerer, doc ids, unanswerable or not, few-shots), and the decompose
    prompts."""
    items: list[Item] = []
    info: dict[str, dict[str, Any]] = {}
    d_rows = []
    for i, j, sim in pairs:
        a, b = docs[i], docs[j]
        sid = f"{a['doc_id']}+{b['doc_id']}#multihop"
        shots = ctx.draw_shots(sid)
        paras = [shorten(a["text"], scfg.paragraph_max_chars),
                 shorten(b["text"], scfg.paragraph_max_chars)]
        doc_ids = [a["doc_id"], b["doc_id"]]
        unans = is_unanswerable(ctx.seed, sid, scfg.unanswerable_fraction)
        shown = list(paras)
        if unans:
            k = pick_distractor(vecs, i, {i, j})
            if k is None:
                unans = False
            else:
                shown[1] = shorten(docs[k]["text"], scfg.paragraph_max_chars)
                doc_ids.append(docs[k]["doc_id"])
        it = Item(sid, a["doc_id"], a["corpus"], [s.id for s in shots],
                  sorted(set(a["fewshot_ids"]) | set(b["fewshot_ids"])),
                  extra={"pair_similarity": sim})
        items.append(it)
        info[sid] = {"paras": paras, "shown": shown, "doc_ids": doc_ids, "unans": unans,
                     "shots": shots}
        user = f"{DECOMPOSE_INSTRUCTION}\n\nParagraph 1: {paras[0]}\n\nParagraph 2: {paras[1]}"
        d_rows.append(prompt_row(ctx, sid, [{"role": "user", "content": user}],
                                 DECOMPOSE_SCHEMA, max_new))
    return items, info, d_rows


def _answer_rows(ctx: StepContext, dec: dict[str, Any], info: dict[str, dict[str, Any]],
                 by_id: dict[str, Item], max_new: int) -> list[dict[str, Any]]:
    """Reject the failed decompositions; the prompts answering each single question from
    its shown paragraph (sample id ``SID/k``)."""
    a_rows = []
    for sid, res in sorted(dec.items()):
        if res["obj"] is None:
            by_id[sid].reject("multihop_decompose", res["reason"], res["detail"], res["text"])
            continue
        for k, q in enumerate(res["obj"]["sub_questions"]):
            a_rows.append(prompt_row(ctx, f"{sid}/{k}", _answer_messages(
                ctx, info[sid]["shots"], info[sid]["shown"][k], q), ANSWER_SCHEMA, max_new))
    return a_rows


def _final_rows(ctx: StepContext, dec: dict[str, Any], ans: dict[str, Any],
                info: dict[str, dict[str, Any]], by_id: dict[str, Item], max_new: int
                ) -> list[dict[str, Any]]:
    """Reject the items with a failed single answer; keep the others' sub-questions in
    ``info[sid]["subs"]`` and return their final-answer prompts."""
    f_rows = []
    for sid, res in sorted(dec.items()):
        if res["obj"] is None:
            continue
        subs = []
        for k, q in enumerate(res["obj"]["sub_questions"]):
            a = ans[f"{sid}/{k}"]
            if a["obj"] is None:
                by_id[sid].reject("multihop_answers", a["reason"], a["detail"], a["text"])
                break
            subs.append({"question": q, "paragraph": info[sid]["shown"][k],
                         "long_answer": a["obj"]["long_answer"],
                         "unanswerable": bool(info[sid]["unans"] and k == 1)})
        if by_id[sid].reject_reason:
            continue
        info[sid]["subs"] = subs
        steps = "\n".join(f"Single question {k + 1}: {s['question']}\nAnswer {k + 1}: "
                          f"{s['long_answer']}" for k, s in enumerate(subs))
        user = f"{FINAL_INSTRUCTION}\n\nQuestion: {res['obj']['question']}\n\n{steps}"
        f_rows.append(prompt_row(ctx, sid, [{"role": "user", "content": user}], FINAL_SCHEMA,
                                 max_new))
    return f_rows


def record_types() -> Any:
    import pyarrow as pa

    sub = pa.struct([("question", pa.string()), ("paragraph", pa.string()),
                     ("long_answer", pa.string()), ("unanswerable", pa.bool_())])
    return [("question", pa.string()), ("final_answer", pa.string()), ("thought", pa.string()),
            ("sub_questions", pa.list_(sub)), ("unanswerable", pa.bool_()),
            ("doc_ids", pa.list_(pa.string()))]
