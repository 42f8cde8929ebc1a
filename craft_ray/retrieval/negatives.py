"""Hard-negative mining for retriever training, as LLM-Embedder does it.

For every query with known positives (BEIR qrels, relevance > 0): retrieve the top
``top_k`` (200) documents with the dense retriever (embed + retrieval stages) and with BM25
(``bm25s``); merge the two rankings (alternating, first occurrence kept); drop candidates
that are a positive (same corpus index or same text, as LLM-Embedder compares contents)
and, optionally, candidates containing one of the query's answer strings; keep the first
``num_negatives``. Output: LLM-Embedder's training jsonl, one line per query::

    {"query": str, "pos": [str], "neg": [str], "pos_index": [int], "neg_index": [int],
     "query_id": str, "answers": [str] (when known)}

``pos_index`` / ``neg_index`` are 0-based line numbers in the BEIR ``corpus.jsonl`` (blank
lines not counted), i.e. indices into the corpus LLM-Embedder is given.

``data``, ``out`` and ``run_dir`` may be ``s3://`` / ``gs://`` URIs: the BEIR folder is read
from its download in this machine's storage cache, the dense retriever's work folder is the
bucket's (see :mod:`craft_ray.retrieval.evaluation`), and the jsonl is written locally and
uploaded whole when complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from craft_ray.config import RayConfig, StrictModel
from craft_ray.retrieval.evaluation import (
    Beir,
    BeirError,
    RetrievalEvalConfig,
    dense_rankings,
    load_beir,
)
from craft_ray.runtime import storage

logger = logging.getLogger(__name__)


class MineNegativesConfig(StrictModel):
    """Config of ``craft-ray mine-negatives``."""

    data: str = Field(description="BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/); "
                      "local or s3:// / gs://.")
    split: str = Field(default="train", description="qrels split holding the positives.")
    out: str = Field(description="Output jsonl (LLM-Embedder training format); a path or "
                     "s3:// / gs:// URI.")
    retrievers: list[Literal["dense", "bm25"]] = Field(
        default_factory=lambda: ["dense", "bm25"], min_length=1,
        description="Where candidates come from (LLM-Embedder mined with BGE and BM25).")
    top_k: int = Field(default=200, ge=1, le=100_000, description="Candidates per retriever.")
    num_negatives: int = Field(default=100, ge=1, le=100_000,
                               description="Negatives kept per query (LLM-Embedder: 100).")
    filter_answers: bool = Field(
        default=False, description="Also drop candidates containing an answer string.")
    answers_field: str = Field(
        default="answers", description="Field of queries.jsonl with the answer strings.")
    model: str = Field(default="sentence-transformers/all-MiniLM-L6-v2",
                       description="Dense retriever (sentence-transformers id or path).")
    run_dir: str = Field(default="runs/mine-negatives",
                         description="Work folder: converted corpus and embedding store "
                         "(local or s3:// / gs://).")
    bm25_k1: float = Field(default=1.5, gt=0, description="BM25 k1.")
    bm25_b: float = Field(default=0.75, ge=0, le=1, description="BM25 b.")
    concurrency: int = Field(default=1, ge=1, description="Embedding/similarity actors.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per actor.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")

    @model_validator(mode="after")
    def _no_credentials(self) -> MineNegativesConfig:
        for p in (self.data, self.out, self.run_dir):
            storage.check_no_credentials(p)
        return self


def load_corpus_texts(path: Path) -> tuple[list[str], list[str]]:
    """BEIR ids and ``title + " " + text`` by corpus line (blank lines skipped)."""
    ids, texts = [], []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BeirError(f"{path}:{i}: not valid JSON ({exc})") from None
            ids.append(str(d["_id"]))
            texts.append((str(d.get("title") or "") + " " + str(d.get("text") or "")).strip())
    return ids, texts


def load_answers(data: Path, field: str) -> dict[str, list[str]]:
    """Answer strings per query id from ``queries.jsonl`` (str or list of str)."""
    out: dict[str, list[str]] = {}
    with (data / "queries.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            q = json.loads(line)
            a = q.get(field)
            if a is None and isinstance(q.get("metadata"), dict):
                a = q["metadata"].get(field)
            if isinstance(a, str):
                a = [a]
            if a:
                out[str(q["_id"])] = [str(x) for x in a]
    return out


def bm25_rankings(texts: list[str], queries: dict[str, str], k: int, k1: float = 1.5,
                  b: float = 0.75) -> dict[str, list[int]]:
    """Top-``k`` corpus indices per query with ``bm25s`` (English stopwords, lowercase)."""
    import bm25s

    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False),
                    show_progress=False)
    qids = list(queries)
    q_tokens = bm25s.tokenize([queries[q] for q in qids], stopwords="en", return_ids=False,
                              show_progress=False)
    k = min(k, len(texts))
    out: dict[str, list[int]] = {}
    for qid, toks in zip(qids, q_tokens):
        if not toks:  # nothing but stopwords: BM25 has no opinion
            out[qid] = []
            continue
        docs, scores = retriever.retrieve([toks], k=k, show_progress=False)
        # bm25s returns k results even when fewer documents match; keep real matches only.
        out[qid] = [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]
    return out


def merge_rankings(rankings: Sequence[Sequence[int]]) -> list[int]:
    """Interleave rankings (1st of each, then 2nd of each, ...), first occurrence kept."""
    seen: dict[int, None] = {}
    depth = max((len(r) for r in rankings), default=0)
    for i in range(depth):
        for r in rankings:
            if i < len(r) and r[i] not in seen:
                seen[r[i]] = None
    return list(seen)


def pick_negatives(candidates: Sequence[int], pos_index: Sequence[int], texts: Sequence[str],
                   n: int, answers: Sequence[str] = ()) -> list[int]:
    """Candidates that are not a positive (by index or identical text) and, with
    ``answers``, contain none of them (case-insensitive); the first ``n``."""
    pos_set = set(pos_index)
    pos_texts = {texts[i] for i in pos_index}
    low = [a.lower() for a in answers if a]
    out = []
    for c in candidates:
        if c in pos_set or texts[c] in pos_texts:
            continue
        if low and any(a in texts[c].lower() for a in low):
            continue
        out.append(c)
        if len(out) >= n:
            break
    return out


def run_mine_negatives(cfg: MineNegativesConfig, beir: Beir | None = None) -> dict[str, Any]:
    """Mine negatives for every query of the split and write the jsonl (atomically).

    Ray must be initialised when the dense retriever is used.
    """
    t0 = time.time()
    beir = beir or load_beir(cfg.data, cfg.split)
    ids, texts = load_corpus_texts(beir.corpus_path)
    index_of = {d: i for i, d in enumerate(ids)}
    positives: dict[str, list[int]] = {}
    unknown = 0
    for qid, rels in beir.qrels.items():
        pos = [index_of[d] for d, r in rels.items() if r > 0 and d in index_of]
        unknown += sum(1 for d, r in rels.items() if r > 0 and d not in index_of)
        if pos:
            positives[qid] = sorted(pos)
    if unknown:
        logger.warning("mine-negatives: %d positives are not in corpus.jsonl; ignored", unknown)
    queries = {q: beir.queries[q] for q in positives}
    answers = load_answers(beir.corpus_path.parent, cfg.answers_field) \
        if cfg.filter_answers else {}

    rankings: dict[str, dict[str, list[int]]] = {}
    timings: dict[str, float] = {}
    if "dense" in cfg.retrievers:
        t = time.time()
        dcfg = RetrievalEvalConfig(data=cfg.data, split=cfg.split, model=cfg.model,
                                   run_dir=cfg.run_dir, concurrency=cfg.concurrency,
                                   num_gpus=cfg.num_gpus, ray=cfg.ray)
        _, rankings["dense"], _ = dense_rankings(dcfg, beir, queries, cfg.top_k)
        timings["dense_s"] = round(time.time() - t, 2)
    if "bm25" in cfg.retrievers:
        t = time.time()
        rankings["bm25"] = bm25_rankings(texts, queries, cfg.top_k, cfg.bm25_k1, cfg.bm25_b)
        timings["bm25_s"] = round(time.time() - t, 2)

    n_neg: list[int] = []
    with storage.write_once(cfg.out) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for qid, pos in positives.items():
            cands = merge_rankings([rankings[r].get(qid, []) for r in cfg.retrievers])
            neg = pick_negatives(cands, pos, texts, cfg.num_negatives, answers.get(qid, ()))
            n_neg.append(len(neg))
            item: dict[str, Any] = {
                "query": queries[qid], "pos": [texts[i] for i in pos],
                "neg": [texts[i] for i in neg], "pos_index": pos, "neg_index": neg,
                "query_id": qid,
            }
            if qid in answers:
                item["answers"] = answers[qid]
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    return {
        "out": storage.redact(cfg.out), "queries": len(positives), "corpus": len(texts),
        "retrievers": list(cfg.retrievers), "top_k": cfg.top_k,
        "negatives_mean": round(sum(n_neg) / len(n_neg), 2) if n_neg else 0.0,
        "queries_without_negatives": sum(1 for n in n_neg if n == 0),
        "seconds": {**timings, "total": round(time.time() - t0, 2)},
    }
