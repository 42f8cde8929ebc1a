"""Record contracts of the generation strategies, as :class:`craft_ray.tasks.Task` objects.

The filter, train, sweep and evaluate stages read task samples through a ``Task``
(``record_fields``, ``validate``, ``sample_text``, ``training_pair``, ``convert_fewshot``), so
each strategy's record layout is one ``Task`` here, registered under the strategy's name in
:func:`craft_ray.tasks.registry.get_task` (``task: cst`` / ``multihop`` / ``rag_answer``):

- ``cst`` (AugCon): ``question``, ``answer``, ``context`` (the node's text), ``depth``,
  ``span_start``/``span_end`` (the node's characters in the document), ``node_id``,
  ``parent_id`` ("" for a root), ``score`` (the scorer's similarity). Training: question ->
  answer (AugCon's context-driven SFT pairs hold only question and answer).
- ``multihop`` (qa-expert): ``question``, ``final_answer``, ``thought``, ``sub_questions``
  (each ``question``, ``paragraph``, ``long_answer``, ``unanswerable``), ``unanswerable``,
  ``doc_ids``. Training: the paragraphs and the question -> sub-answers, thought, final answer.
- ``rag_answer`` (Instruction-FineTuning): ``system``, ``question``, ``context`` (the gold
  chunks), ``chunks_rag`` (gold + noisy chunks, shuffled), ``gold_index``, ``answer``,
  ``relevance``, ``global_relevance``, ``coverage``. Training: system + numbered chunks +
  question -> answer (the fine-tuned model sees the noise it must ignore).

Invariant (as for every task): ``validate`` returns exactly ``record_fields``, in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from craft_ray.tasks.base import Task, TaskValidationError
from craft_ray.tasks.fewshots import FewShot

STRATEGY_TASKS = ("cst", "multihop", "rag_answer")

# The system turn of rag_answer's answer and training prompts (``rag_answer.system_prompt``).
DEFAULT_RAG_SYSTEM = (
    "You are an assistant that answers the question using only the chunks of context given. "
    "Some chunks are irrelevant: ignore them. If the chunks do not contain the answer, say so.")

EMPTY_QUESTION = "Question missing or shorter than 8 characters."
EMPTY_ANSWER = "Answer missing or empty."


def _text(obj: Mapping[str, Any], key: str, min_chars: int = 1, msg: str | None = None) -> str:
    val = obj.get(key)
    if not isinstance(val, str) or len(val.strip()) < min_chars:
        raise TaskValidationError(msg or f"Field '{key}' missing, not a string or too short.")
    return val.strip()


def _int(obj: Mapping[str, Any], key: str) -> int:
    val = obj.get(key)
    if isinstance(val, bool) or not isinstance(val, int | float) or int(val) != val:
        raise TaskValidationError(f"Field '{key}' is not an integer.")
    return int(val)


def _score(obj: Mapping[str, Any], key: str) -> float | None:
    val = obj.get(key)
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise TaskValidationError(f"Field '{key}' is not a number.")
    return float(val)


def numbered_chunks(chunks: list[str]) -> str:
    """The chunks as a RAG prompt shows them: ``[1] ...`` one per paragraph."""
    return "\n\n".join(f"[{i + 1}] {c.strip()}" for i, c in enumerate(chunks))


class CSTTask(Task):
    """AugCon Context-Split-Tree records."""

    name = "cst"
    record_fields = ["question", "answer", "context", "depth", "span_start", "span_end",
                     "node_id", "parent_id", "score"]
    system_prompt = "Answer the question accurately and completely."
    max_new_tokens = 256

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        rec = {"question": _text(obj, "question", 8, EMPTY_QUESTION),
               "answer": _text(obj, "answer", 1, EMPTY_ANSWER),
               "context": _text(obj, "context"), "depth": _int(obj, "depth"),
               "span_start": _int(obj, "span_start"), "span_end": _int(obj, "span_end"),
               "node_id": _text(obj, "node_id"), "parent_id": str(obj.get("parent_id") or ""),
               "score": _score(obj, "score")}
        if rec["depth"] < 0 or not 0 <= rec["span_start"] < rec["span_end"]:
            raise TaskValidationError("Depth negative or span empty.")
        return rec

    def sample_text(self, record: Mapping[str, Any]) -> str:
        return f"{record['question']}\n{record['answer']}"

    def training_pair(self, record: Mapping[str, Any]) -> tuple[str, str]:
        return str(record["question"]), str(record["answer"])

    def convert_fewshot(self, shot: FewShot) -> tuple[dict[str, Any], list[str]]:
        raw = {"question": shot.instruction, "answer": shot.output, "context": shot.text,
               "depth": 0, "span_start": 0, "span_end": max(1, len(shot.text)),
               "node_id": f"fewshot:{shot.id}", "parent_id": "", "score": None}
        return self._finish_fewshot(raw, [])


class MultihopTask(Task):
    """qa-expert multi-hop records."""

    name = "multihop"
    record_fields = ["question", "final_answer", "thought", "sub_questions", "unanswerable",
                     "doc_ids"]
    system_prompt = ("Answer the question. Decompose it into single questions, answer each from "
                     "its paragraph, then combine the answers.")
    max_new_tokens = 512

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        subs = obj.get("sub_questions")
        if not isinstance(subs, list) or len(subs) < 2:
            raise TaskValidationError("Fewer than two sub-questions.")
        clean_subs = []
        for s in subs:
            if not isinstance(s, Mapping):
                raise TaskValidationError("A sub-question is not an object.")
            clean_subs.append({"question": _text(s, "question", 8, EMPTY_QUESTION),
                               "paragraph": _text(s, "paragraph"),
                               "long_answer": _text(s, "long_answer", 1, EMPTY_ANSWER),
                               "unanswerable": bool(s.get("unanswerable", False))})
        doc_ids = obj.get("doc_ids") or []
        if not isinstance(doc_ids, list):
            raise TaskValidationError("Field 'doc_ids' is not a list.")
        return {"question": _text(obj, "question", 8, EMPTY_QUESTION),
                "final_answer": _text(obj, "final_answer", 1, EMPTY_ANSWER),
                "thought": str(obj.get("thought") or "").strip(),
                "sub_questions": clean_subs,
                "unanswerable": any(s["unanswerable"] for s in clean_subs),
                "doc_ids": [str(d) for d in doc_ids]}

    def sample_text(self, record: Mapping[str, Any]) -> str:
        subs = " | ".join(str(s["question"]) for s in record["sub_questions"])
        return f"{record['question']}\n{subs}\n{record['final_answer']}"

    def training_pair(self, record: Mapping[str, Any]) -> tuple[str, str]:
        subs = list(record["sub_questions"])
        paras = numbered_chunks([str(s["paragraph"]) for s in subs])
        prompt = f"Paragraphs:\n{paras}\n\nQuestion: {record['question']}"
        steps = "\n".join(f"Sub-question {i + 1}: {s['question']}\nAnswer {i + 1}: "
                          f"{s['long_answer']}" for i, s in enumerate(subs))
        thought = f"\nThought: {record['thought']}" if record.get("thought") else ""
        return prompt, f"{steps}{thought}\nFinal answer: {record['final_answer']}"

    def convert_fewshot(self, shot: FewShot) -> tuple[dict[str, Any], list[str]]:
        sub = {"question": shot.instruction, "paragraph": shot.text,
               "long_answer": shot.output, "unanswerable": False}
        raw = {"question": shot.instruction, "final_answer": shot.output, "thought": "",
               "sub_questions": [sub, sub], "doc_ids": []}
        return self._finish_fewshot(raw, ["a single-document few-shot shown as two hops"])


class RagAnswerTask(Task):
    """Instruction-FineTuning RAG records."""

    name = "rag_answer"
    record_fields = ["system", "question", "context", "chunks_rag", "gold_index", "answer",
                     "relevance", "global_relevance", "coverage"]
    system_prompt = ""  # each record carries its own system turn
    max_new_tokens = 256

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        chunks = obj.get("chunks_rag")
        if not isinstance(chunks, list) or not chunks or not all(
                isinstance(c, str) and c.strip() for c in chunks):
            raise TaskValidationError("Field 'chunks_rag' is not a non-empty list of chunks.")
        gold = _int(obj, "gold_index")
        context = _text(obj, "context")
        if not 0 <= gold < len(chunks) or chunks[gold].strip() != context:
            raise TaskValidationError("gold_index does not point at the context chunk.")
        return {"system": _text(obj, "system"),
                "question": _text(obj, "question", 8, EMPTY_QUESTION), "context": context,
                "chunks_rag": [c.strip() for c in chunks], "gold_index": gold,
                "answer": _text(obj, "answer", 1, EMPTY_ANSWER),
                "relevance": _score(obj, "relevance"),
                "global_relevance": _score(obj, "global_relevance"),
                "coverage": _score(obj, "coverage")}

    def sample_text(self, record: Mapping[str, Any]) -> str:
        return f"{record['question']}\n{record['answer']}"

    def training_pair(self, record: Mapping[str, Any]) -> tuple[str, str]:
        return rag_prompt(str(record["system"]), list(record["chunks_rag"]),
                          str(record["question"])), str(record["answer"])

    def convert_fewshot(self, shot: FewShot) -> tuple[dict[str, Any], list[str]]:
        raw = {"system": DEFAULT_RAG_SYSTEM, "question": shot.instruction,
               "context": shot.text.strip(), "chunks_rag": [shot.text.strip()], "gold_index": 0,
               "answer": shot.output}
        return self._finish_fewshot(raw, [])


def rag_prompt(system: str, chunks: list[str], question: str) -> str:
    """The RAG prompt of answers and of training: system, numbered chunks, question."""
    return f"{system.strip()}\n\nChunks:\n{numbered_chunks(chunks)}\n\nQuestion: {question.strip()}"


def strategy_task(name: str) -> Task:
    """The record contract of a strategy by name."""
    return {"cst": CSTTask, "multihop": MultihopTask, "rag_answer": RagAnswerTask}[name]()
