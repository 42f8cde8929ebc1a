"""Training examples for the retriever: LLM-Embedder jsonl, BEIR folders, CRAFT runs.

Every source becomes a list of :class:`Example` (a query, its positive and negative key
texts, optional teacher scores over ``pos + neg`` and answers). Malformed rows do not kill
the load: they are returned as rejects ``{"source", "line", "reason"}`` and the caller fails
past a configured fraction, with a message naming the file and what was expected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from craft_ray.retrieval.evaluation import BeirError, load_beir
from craft_ray.tasks.fewshots import FewShot, embed_text

JSONL_EXPECTED = ("an object {query: str, pos: [str] (or pos_index with --corpus), neg: [str] "
                  "(optional, or neg_index), teacher_scores: [float] over pos+neg (optional), "
                  "answers: [str] (optional)}")


class RetrieverDataError(ValueError):
    """Training data cannot be used (message names the file and what was expected)."""


@dataclass
class Example:
    """One training query: positives first in ``keys`` order, then negatives."""

    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    teacher_scores: list[float] | None = None  # over pos + neg, in that order
    answers: list[str] = field(default_factory=list)
    query_id: str = ""

    def as_json(self) -> dict[str, Any]:
        """LLM-Embedder's training format (plus ``query_id``)."""
        out: dict[str, Any] = {"query": self.query, "pos": self.pos, "neg": self.neg,
                               "query_id": self.query_id}
        if self.teacher_scores is not None:
            out["teacher_scores"] = self.teacher_scores
        if self.answers:
            out["answers"] = self.answers
        return out


def _str_list(v: Any) -> list[str] | None:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    return None


def _from_index(rec: Mapping[str, Any], key: str, corpus: Sequence[str] | None
                ) -> tuple[list[str] | None, str]:
    idx = rec.get(f"{key}_index")
    if idx is None:
        return None, ""
    if corpus is None:
        return None, f"has {key}_index but no {key} texts; pass the corpus (--set corpus=...)"
    if not isinstance(idx, list) or not all(isinstance(i, int) for i in idx):
        return None, f"{key}_index must be a list of integers"
    bad = [i for i in idx if not 0 <= i < len(corpus)]
    if bad:
        return None, f"{key}_index {bad[:3]} outside the corpus of {len(corpus)} documents"
    return [corpus[i] for i in idx], ""


def parse_example(rec: Any, corpus: Sequence[str] | None = None) -> tuple[Example | None, str]:
    """One LLM-Embedder training row -> (Example, "") or (None, reason)."""
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    query = rec.get("query")
    if not isinstance(query, str) or not query.strip():
        return None, "no non-empty string 'query'"
    pos = _str_list(rec["pos"]) if "pos" in rec else None
    if pos is None and "pos" in rec:
        return None, "'pos' must be a list of strings"
    if not pos:
        pos, why = _from_index(rec, "pos", corpus)
        if why:
            return None, why
    if not pos:
        return None, "no positive: 'pos' (list of strings) is missing or empty"
    neg = _str_list(rec["neg"]) if "neg" in rec else None
    if neg is None and rec.get("neg") is not None:
        return None, "'neg' must be a list of strings"
    if not neg and rec.get("neg_index"):
        neg, why = _from_index(rec, "neg", corpus)
        if why:
            return None, why
    neg = neg or []
    scores = rec.get("teacher_scores")
    if scores is not None:
        ok = isinstance(scores, list) and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
            for s in scores)
        if not ok:
            return None, "'teacher_scores' must be a list of finite numbers"
        if len(scores) != len(pos) + len(neg):
            return None, (f"'teacher_scores' has {len(scores)} values for {len(pos)} pos + "
                          f"{len(neg)} neg")
        scores = [float(s) for s in scores]
    answers = _str_list(rec.get("answers")) if rec.get("answers") is not None else []
    if answers is None:
        return None, "'answers' must be a string or a list of strings"
    return Example(query, pos, neg, scores, answers, str(rec.get("query_id", ""))), ""


def load_corpus_file(path: str | Path) -> list[str]:
    """Texts by line of a corpus jsonl (BEIR ``title + text`` or a ``text`` field)."""
    p = Path(path)
    if not p.is_file():
        raise RetrieverDataError(f"corpus {p} does not exist (a jsonl with 'text' per line)")
    out = []
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RetrieverDataError(f"corpus {p}:{i}: not valid JSON ({exc})") from None
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise RetrieverDataError(f"corpus {p}:{i}: expected an object with a string "
                                         "'text' field")
            out.append((str(d.get("title") or "") + " " + d["text"]).strip())
    return out


def load_jsonl_examples(path: str | Path, corpus: Sequence[str] | None = None
                        ) -> tuple[list[Example], list[dict[str, Any]]]:
    """Read LLM-Embedder training jsonl -> (examples, rejects)."""
    p = Path(path)
    if not p.is_file():
        raise RetrieverDataError(f"training data {p} does not exist (expected a BEIR folder "
                                 "or a jsonl file in LLM-Embedder's format)")
    examples, rejects = [], []
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                rejects.append({"source": str(p), "line": i, "reason": f"not valid JSON: {exc}"})
                continue
            ex, why = parse_example(rec, corpus)
            if ex is None:
                rejects.append({"source": str(p), "line": i, "reason": why})
            else:
                examples.append(ex)
    return examples, rejects


def check_rejects(source: str, n_ok: int, rejects: list[dict[str, Any]],
                  max_fraction: float) -> None:
    """Fail (naming the file, the first bad lines and the expected format) when the share of
    malformed rows is above ``max_fraction`` or nothing usable is left."""
    total = n_ok + len(rejects)
    if n_ok and len(rejects) <= max_fraction * total:
        return
    first = "; ".join(f"line {r['line']}: {r['reason']}" for r in rejects[:3])
    if total == 0:
        raise RetrieverDataError(f"training data {source} holds no rows; expected one JSON "
                                 f"object per line: {JSONL_EXPECTED}")
    raise RetrieverDataError(
        f"training data {source}: {len(rejects)} of {total} rows are malformed ({first}); "
        f"expected per line {JSONL_EXPECTED}. Fix the rows or raise max_reject_fraction "
        f"(now {max_fraction}) to skip them")


def beir_examples(data: str | Path, split: str, negatives: Mapping[str, list[str]] | None
                  = None) -> list[Example]:
    """One example per query of a BEIR split with a positive (qrels > 0).

    Negatives: ``negatives[query_id]`` when given (mined), else the qrels' documents with
    score <= 0 (judged non-relevant).
    """
    from craft_ray.retrieval.negatives import load_corpus_texts

    try:
        beir = load_beir(data, split)
    except BeirError as exc:
        raise RetrieverDataError(f"BEIR training data: {exc}") from None
    ids, texts = load_corpus_texts(beir.corpus_path)
    index = {d: i for i, d in enumerate(ids)}
    out = []
    for qid, rels in beir.qrels.items():
        pos = [texts[index[d]] for d, r in rels.items() if r > 0 and d in index]
        if not pos:
            continue
        if negatives is not None:
            neg = list(negatives.get(qid, []))
        else:
            neg = [texts[index[d]] for d, r in rels.items() if r <= 0 and d in index]
        out.append(Example(beir.queries[qid], pos, neg, query_id=qid))
    if not out:
        raise RetrieverDataError(f"BEIR folder {data}: no query of qrels/{split}.tsv has a "
                                 "positive document in corpus.jsonl")
    return out


# --- CRAFT: few-shots and the documents the retrieve stage found for them -----------------


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a parquet or jsonl file."""
    p = Path(path)
    if not p.is_file():
        raise RetrieverDataError(f"{p} does not exist")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    rows = []
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RetrieverDataError(f"{p}:{i}: not valid JSON ({exc})") from None
    return rows


def craft_examples(samples: Sequence[Mapping[str, Any]], shots: Sequence[FewShot],
                   query_template: str, positives_per_shot: int,
                   relevance: Mapping[tuple[str, str], float] | None = None,
                   min_relevance: float = 0.5, source: str = "corpus_samples"
                   ) -> list[Example]:
    """Training examples from a retrieve stage's ``corpus_samples``: one per few-shot.

    The query is the few-shot as the retrieve stage embedded it. Without ``relevance`` a
    few-shot's positives are the ``positives_per_shot`` documents it ranked highest. With
    ``relevance`` ({(fewshot_id, doc_id): score}, e.g. an LLM judge's) the documents retrieved
    for the few-shot and scored >= ``min_relevance`` are positives and those scored below are
    its hard negatives; unscored documents are left out. Few-shots without a positive are
    skipped.
    """
    need = {"doc_id", "text", "fewshot_ids", "fewshot_ranks"}
    if samples and not need <= set(samples[0]):
        raise RetrieverDataError(f"{source}: rows need {sorted(need)} (a retrieve stage's "
                                 f"corpus_samples); got {sorted(samples[0])}")
    per_shot: dict[str, list[tuple[int, str, str]]] = {}
    for row in samples:
        for sid, rank in zip(row["fewshot_ids"], row["fewshot_ranks"]):
            per_shot.setdefault(str(sid), []).append((int(rank), str(row["doc_id"]),
                                                      str(row["text"])))
    out = []
    for shot in shots:
        docs = sorted(per_shot.get(shot.id, []))
        if relevance is None:
            pos, neg = [t for _, _, t in docs[:positives_per_shot]], []
        else:
            scored = [(relevance.get((shot.id, d)), t) for _, d, t in docs]
            pos = [t for s, t in scored if s is not None and s >= min_relevance]
            neg = [t for s, t in scored if s is not None and s < min_relevance]
        if pos:
            out.append(Example(embed_text(shot, query_template), pos, neg, query_id=shot.id))
    if not out:
        raise RetrieverDataError(f"{source}: no few-shot has a positive document (do the "
                                 "few-shot ids match the retrieve run's, and the relevance "
                                 "file's fewshot_id/doc_id?)")
    return out


def load_relevance(path: str | Path) -> dict[tuple[str, str], float]:
    """Judge scores ``{fewshot_id, doc_id, relevance}`` (jsonl or parquet) as a dict."""
    out = {}
    for i, r in enumerate(read_rows(path), 1):
        try:
            out[(str(r["fewshot_id"]), str(r["doc_id"]))] = float(r["relevance"])
        except (KeyError, TypeError, ValueError):
            raise RetrieverDataError(f"{path}: row {i}: expected fewshot_id, doc_id and a "
                                     f"numeric relevance; got {r!r:.200}") from None
    return out


def write_examples(path: Path, examples: Sequence[Example]) -> None:
    """Examples as LLM-Embedder jsonl (what the run trained on, for inspection)."""
    from craft_ray.runtime import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.as_json(), ensure_ascii=False) + "\n")
