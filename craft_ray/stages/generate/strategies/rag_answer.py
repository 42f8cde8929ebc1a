"""``generate.strategy: rag_answer`` — Instruction-FineTuning's RAG training data.

1. Chunks: each document is cut into sentence-aligned chunks of about ``chunk_chars``
   (:func:`chunk_text`); ``chunks_per_prompt`` consecutive chunks form a window
   (:func:`windows`), the gold context of its questions.
2. ``rag_questions``: ``questions_per_prompt`` questions per window on the configured topics.
3. ``rag_evaluation``: each question scored 1-5 for relevance (to its context), global
   relevance (to ``scenario``, the deployment described in the config) and coverage (how far
   the context answers it); a question below ``min_score`` on any of them is rejected. The
   scorer is ``rag_answer.evaluator`` through the judge machinery of :mod:`craft_ray.judging`
   (any backend), or by default the generator itself, guided to the score schema.
4. Noise: the gold document's nearest neighbours in the embedding store give ``noisy_chunks``
   irrelevant chunks (:func:`noise_chunks`); gold and noise are shuffled, the gold position
   recorded (:func:`mix_chunks`).
5. ``rag_answers``: the answer given the system prompt, the shuffled chunks and the question —
   the same prompt the fine-tuned model is trained and evaluated on
   (:func:`craft_ray.tasks.strategies.rag_prompt`).
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
    sentence_cuts,
    shorten,
    store_path,
    store_vectors,
    text_prop,
)
from craft_ray.tasks.strategies import rag_prompt

QUESTION_INSTRUCTION = (
    "Please carefully read the text below. Then write up to {n} different questions about "
    "{topics} that the text answers. Return the output only as a JSON structure in this "
    'format: {{"questions": ["<question one>", "..."]}}')
EVAL_INSTRUCTION = (
    "You evaluate questions for a question-answering assistant. Scenario: {scenario}\n\n"
    "Rate the question below from 1 (poor) to 5 (excellent) on: relevance (is it about the "
    "document?), global_relevance (would a user in the scenario ask it?) and coverage (does the "
    "document hold the information to answer it?). Return the output only as a JSON structure "
    'in this format: {{"relevance": <1-5>, "global_relevance": <1-5>, "coverage": <1-5>}}'
    "\n\nDocument: {context}\n\nQuestion: {question}")
ANSWER_INSTRUCTION = ('Return the output only as a JSON structure in this format: '
                      '{"answer": "<answer here>"}')
_SCORE = {"type": "integer", "enum": [1, 2, 3, 4, 5]}
EVAL_SCHEMA = obj_schema({"relevance": _SCORE, "global_relevance": _SCORE, "coverage": _SCORE})
ANSWER_SCHEMA = obj_schema({"answer": text_prop(1)})

REJECT_LOW_EVAL = "Question evaluation below min_score."


def questions_schema(n: int) -> dict[str, Any]:
    return obj_schema({"questions": {"type": "array", "items": text_prop(8), "minItems": 1,
                                     "maxItems": n}})


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Sentence-aligned chunks of about ``chunk_chars`` (a longer sentence is cut at words)."""
    text = text.strip()
    if not text:
        return []
    bounds = [0, *sentence_cuts(text), len(text)]
    sentences = [text[a:b].strip() for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]
    pieces: list[str] = []
    for s in sentences:
        while len(s) > chunk_chars:
            cut = shorten(s, chunk_chars)
            pieces.append(cut)
            s = s[len(cut):].strip()
        if s:
            pieces.append(s)
    chunks: list[str] = []
    for p in pieces:
        if chunks and len(chunks[-1]) + 1 + len(p) <= chunk_chars:
            chunks[-1] = f"{chunks[-1]} {p}"
        else:
            chunks.append(p)
    return chunks


def windows(chunks: list[str], n: int, max_windows: int) -> list[tuple[int, str]]:
    """Non-overlapping runs of ``n`` consecutive chunks (a shorter last run is kept when it is
    the only one): ``(first chunk index, joined text)``, at most ``max_windows``."""
    out = []
    for s in range(0, len(chunks), n):
        part = chunks[s:s + n]
        if len(part) < n and out:
            break
        out.append((s, "\n".join(part)))
        if len(out) >= max_windows:
            break
    return out


def noise_chunks(doc_index: int, vecs: np.ndarray, doc_chunks: list[list[str]],
                 neighbours: int, k: int, rng: random.Random, gold: str) -> tuple[
                     list[str], list[int]]:
    """``k`` chunks drawn from the ``neighbours`` documents nearest to ``doc_index`` (never the
    document itself nor a chunk inside the gold text): ``(chunks, their document indices)``."""
    sims = vecs @ vecs[doc_index]
    near = [int(j) for j in np.argsort(-sims, kind="stable") if int(j) != doc_index][:neighbours]
    pool = [(c, j) for j in near for c in doc_chunks[j] if c.strip() and c not in gold]
    picked = rng.sample(pool, min(k, len(pool)))
    return [c for c, _ in picked], [j for _, j in picked]


def mix_chunks(gold: str, noise: list[str], rng: random.Random) -> tuple[list[str], int]:
    """Gold and noise chunks in a random order; returns ``(chunks, gold index)``."""
    chunks = list(noise)
    pos = rng.randint(0, len(chunks))
    chunks.insert(pos, gold)
    return chunks, pos


def _evaluate(ctx: StepContext, scfg: Any, rows: list[dict[str, Any]], prompts: list[str]
              ) -> dict[str, dict[str, Any]]:
    """Question scores through the configured evaluator (judge machinery) or the generator."""
    if scfg.evaluator is None:
        return run_step(ctx, "rag_evaluation", rows, EVAL_SCHEMA,
                        sampling={**ctx.sampling, "temperature": 0.0})
    from craft_ray.judging import backend_generate, reply_error
    from craft_ray.stages.generate.parse import parse_row
    from craft_ray.stages.generate.strategies.common import StepTask

    texts = backend_generate(scfg.evaluator, ctx.seed, "generate.rag_answer.evaluator")(
        prompts) if prompts else []
    task = StepTask("rag_evaluation", EVAL_SCHEMA)
    out = {}
    for r, t in zip(rows, texts):
        error, error_detail = reply_error(t)
        obj, reason, detail = (None, error, error_detail) if error else parse_row(task, t, "", "")
        out[r["sample_id"]] = {"obj": obj, "reason": reason, "detail": detail, "text": t,
                               "prompt_hash": r["prompt_hash"]}
    ctx.step_stats["rag_evaluation"] = {"prompts": len(rows), "evaluator": scfg.evaluator.model}
    return out


def run_rag_answer(ctx: StepContext, docs: list[dict[str, Any]], scfg: Any, run_dir: str
                   ) -> tuple[list[Item], dict[str, Any]]:
    """All RAG items (clean or rejected) and strategy stats. Ray must be initialised."""
    docs = [d for d in docs if d["text"].strip()]
    vecs = store_vectors(store_path(scfg.store, run_dir), [d["doc_id"] for d in docs])
    doc_chunks = [chunk_text(d["text"], scfg.chunk_chars) for d in docs]
    max_new = ctx.cfg.max_new_tokens or 256
    q_schema = questions_schema(scfg.questions_per_prompt)
    wins, q_rows = _question_prompts(ctx, docs, doc_chunks, scfg, q_schema, max_new)
    qs = run_step(ctx, "rag_questions", q_rows, q_schema)
    items, by_id, questions = _question_items(qs, wins, docs)
    e_rows, e_prompts = [], []
    for sid, (wid, q) in questions.items():
        p = EVAL_INSTRUCTION.format(scenario=scfg.scenario, context=wins[wid][1], question=q)
        e_prompts.append(p)
        e_rows.append(prompt_row(ctx, sid, [{"role": "user", "content": p}], EVAL_SCHEMA, 48))
    ev = _evaluate(ctx, scfg, e_rows, e_prompts)
    a_rows, mixed = [], {}
    for sid, (wid, q) in questions.items():
        res = ev[sid]
        if res["obj"] is None:
            by_id[sid].reject("rag_evaluation", res["reason"], res["detail"], res["text"])
            continue
        if min(res["obj"].values()) < scfg.min_score:
            by_id[sid].reject("rag_evaluation", REJECT_LOW_EVAL, json.dumps(res["obj"]), q)
            continue
        di, gold, shots = wins[wid]
        rng = random.Random(f"{ctx.seed}:noise:{sid}")
        noise, noise_docs = noise_chunks(di, vecs, doc_chunks, scfg.neighbours,
                                         scfg.noisy_chunks, rng, gold)
        chunks, gi = mix_chunks(gold, noise, rng)
        mixed[sid] = (chunks, gi, [docs[j]["doc_id"] for j in noise_docs])
        a_rows.append(prompt_row(ctx, sid, _answer_messages(ctx, scfg, shots, chunks, q),
                                 ANSWER_SCHEMA, max_new))
    ans = run_step(ctx, "rag_answers", a_rows, ANSWER_SCHEMA)
    for sid, it, res in final_results(ans, by_id, "rag_answers"):
        chunks, gi, noise_docs = mixed[sid]
        wid, q = questions[sid]
        it.record = {"system": scfg.system_prompt, "question": q, "context": wins[wid][1],
                     "chunks_rag": chunks, "gold_index": gi, "answer": res["obj"]["answer"],
                     **{k: float(v) for k, v in ev[sid]["obj"].items()}}
        it.extra = {"noise_doc_ids": noise_docs}
    return items, {"documents": len(docs), "windows": len(wins), "questions": len(questions),
                   "evaluator": scfg.evaluator.model if scfg.evaluator else "generator"}


def _question_prompts(ctx: StepContext, docs: list[dict[str, Any]],
                      doc_chunks: list[list[str]], scfg: Any, q_schema: dict[str, Any],
                      max_new: int) -> tuple[dict[str, tuple[int, str, list[Any]]],
                                             list[dict[str, Any]]]:
    """Each window of chunks as (document index, text, few-shots) by window id, and the
    prompts asking for its questions."""
    instr = QUESTION_INSTRUCTION.format(n=scfg.questions_per_prompt, topics=scfg.topics)
    wins: dict[str, tuple[int, str, list[Any]]] = {}
    q_rows = []
    for di, d in enumerate(docs):
        for s, text in windows(doc_chunks[di], scfg.chunks_per_prompt, scfg.max_windows_per_doc):
            wid = f"{d['doc_id']}#rag:c{s}"
            shots = ctx.draw_shots(wid)
            wins[wid] = (di, text, shots)
            q_rows.append(prompt_row(ctx, wid, [{"role": "user",
                                                 "content": f"{instr}\n\nText: {text}"}],
                                     q_schema, max_new))
    return wins, q_rows


def _question_items(qs: dict[str, Any], wins: dict[str, tuple[int, str, list[Any]]],
                    docs: list[dict[str, Any]]
                    ) -> tuple[list[Item], dict[str, Item], dict[str, tuple[str, str]]]:
    """One item per distinct question of a window (a window whose output failed is one
    rejected item); the question items by id, and their (window id, question)."""
    items: list[Item] = []
    by_id: dict[str, Item] = {}
    questions: dict[str, tuple[str, str]] = {}  # item id -> (window id, question)
    for wid, res in sorted(qs.items()):
        di, _, shots = wins[wid]
        d = docs[di]
        base = dict(doc_id=d["doc_id"], corpus=d["corpus"], fewshot_ids=[s.id for s in shots],
                    retrieved_by=d["fewshot_ids"])
        if res["obj"] is None:
            it = Item(wid, **base)
            it.reject("rag_questions", res["reason"], res["detail"], res["text"])
            items.append(it)
            continue
        for k, q in enumerate(dict.fromkeys(res["obj"]["questions"])):  # dedup within a window
            it = Item(f"{wid}/q{k}", **base)
            items.append(it)
            by_id[it.sample_id] = it
            questions[it.sample_id] = (wid, q)
    return items, by_id, questions


def _answer_messages(ctx: StepContext, scfg: Any, shots: list[Any], chunks: list[str],
                     question: str) -> list[dict[str, str]]:
    """The answer prompt: each few-shot answered from its own text, then ``question`` from
    the mixed gold and noise ``chunks``."""
    msgs: list[dict[str, str]] = []
    for s in shots:
        msgs.append({"role": "user", "content": rag_prompt(
            scfg.system_prompt, [ctx.shot_text(s)], s.instruction) +
            f"\n\n{ANSWER_INSTRUCTION}"})
        msgs.append({"role": "assistant",
                     "content": json.dumps({"answer": s.output.strip()}, ensure_ascii=False)})
    msgs.append({"role": "user", "content": rag_prompt(scfg.system_prompt, chunks, question) +
                 f"\n\n{ANSWER_INSTRUCTION}"})
    return msgs


def record_types() -> Any:
    import pyarrow as pa

    return [("system", pa.string()), ("question", pa.string()), ("context", pa.string()),
            ("chunks_rag", pa.list_(pa.string())), ("gold_index", pa.int64()),
            ("answer", pa.string()), ("relevance", pa.float64()),
            ("global_relevance", pa.float64()), ("coverage", pa.float64())]
