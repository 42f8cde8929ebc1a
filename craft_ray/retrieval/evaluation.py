"""Retrieval evaluation on BEIR-format folders: embed stage + retrieval stage + IR metrics.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
(``_id``, ``text``) and ``qrels/{split}.tsv`` (``query-id``, ``corpus-id``, ``score``; a header
line). Documents are embedded as ``title + " " + text`` (as BEIR's sentence-transformers
wrapper does) by the embed stage into an embedding store; queries are embedded in float32;
the store is searched with the retrieval stage's exact top-k; metrics, computed by ranx, follow
BEIR / pytrec_eval: nDCG@k with linear graded gains and a log2 discount (trec_eval's
``ndcg_cut``), Recall@k over documents with relevance > 0, MRR@k = 1 / rank of the first
relevant document (BEIR's ``mrr``). Scores are means over the queries that have qrels in the
split. As BEIR does by default, a retrieved document whose id equals the query id is dropped.

On object storage: ``data`` may be an ``s3://`` / ``gs://`` folder (downloaded into this
machine's storage cache, :func:`craft_ray.runtime.storage.local_copy`) and ``run_dir`` a URI:
the converted corpus is uploaded there and the embed stage's actors read it and write the
store there, so no node's local disk is needed by another.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from craft_ray.config import RayConfig, StrictModel
from craft_ray.models.embedder import Backend, Quantize
from craft_ray.runtime import atomic_path, atomic_write_json, storage

logger = logging.getLogger(__name__)

CUTOFFS = (1, 5, 10, 100)


class BeirError(ValueError):
    """A BEIR folder is missing files or holds malformed lines (message names which)."""


class EmbedderSettings(StrictModel):
    """How eval-retrieval runs the embedder: the embed stage's keys of the same names."""

    backend: Backend = Field(default="torch", description="'torch' or 'onnx' (ONNX Runtime, "
                             "CPU), as embed.backend.")
    quantize: Quantize = Field(default="none", description="'int8' (backend onnx only), as "
                               "embed.quantize.")


class RetrievalEvalConfig(StrictModel):
    """Config of ``craft-ray eval-retrieval``."""

    data: str = Field(description="BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/); "
                      "local or s3:// / gs://.")
    split: str = Field(default="test", description="qrels split: qrels/{split}.tsv.")
    model: str = Field(default="sentence-transformers/all-MiniLM-L6-v2",
                       description="sentence-transformers model id or path.")
    cutoffs: list[int] = Field(default_factory=lambda: list(CUTOFFS), min_length=1,
                               description="k of nDCG@k, MRR@k, Recall@k.")
    ignore_identical_ids: bool = Field(
        default=True, description="Drop a retrieved document whose id equals the query id "
        "(BEIR's default; matters for ArguAna, Quora).")
    max_seq_length: int | None = Field(
        default=None, ge=8, description="Token limit (default: the model's own).")
    query_batch_size: int = Field(default=64, ge=1, description="Queries per encode batch.")
    run_dir: str = Field(default="runs/eval-retrieval",
                         description="Work folder: converted corpus and embedding store "
                         "(local or s3:// / gs://).")
    embed_batch_size: int = Field(default=512, ge=1, description="Rows per embedding actor "
                                  "call.")
    concurrency: int = Field(default=1, ge=1, description="Embedding and similarity actors.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per actor.")
    embed: EmbedderSettings = Field(default_factory=EmbedderSettings,
                                    description="Embedder backend and quantisation.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")

    @model_validator(mode="after")
    def _no_credentials(self) -> RetrievalEvalConfig:
        for p in (self.data, self.run_dir):
            storage.check_no_credentials(p)
        return self


@dataclass
class Beir:
    """A loaded BEIR split: query texts and qrels (only queries that have qrels)."""

    corpus_path: Path
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise BeirError(f"{path} does not exist (a BEIR folder needs corpus.jsonl, "
                        "queries.jsonl and qrels/SPLIT.tsv)")
    out = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BeirError(f"{path}:{i}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict) or "_id" not in obj:
                raise BeirError(f"{path}:{i}: expected an object with an '_id' field")
            out.append(obj)
    return out


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """``qrels/{split}.tsv`` -> {query id: {doc id: relevance}} (header line skipped)."""
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise BeirError(f"{path} does not exist (splits here: {have or 'none'}); pass --split")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i, row in enumerate(reader, 1):
            if i == 1 and row and not row[-1].lstrip("-").isdigit():
                continue  # header
            if not row:
                continue
            if len(row) < 3:
                raise BeirError(f"{path}:{i}: expected query-id, corpus-id, score")
            try:
                rel = int(row[2])
            except ValueError:
                raise BeirError(f"{path}:{i}: score {row[2]!r} is not an integer") from None
            qrels.setdefault(row[0], {})[row[1]] = rel
    if not qrels:
        raise BeirError(f"{path} holds no judgements")
    return qrels


def beir_folder(data: str | Path) -> Path:
    """The local folder of a BEIR dataset: itself, or (``s3://`` / ``gs://``) its download
    in this machine's storage cache."""
    if not storage.is_uri(data):
        return Path(data)
    storage.check_location(data, "data")
    try:
        return storage.local_copy(data)
    except FileNotFoundError:
        raise BeirError(f"BEIR folder {storage.redact(data)} does not exist") from None


def load_beir(data: str | Path, split: str = "test") -> Beir:
    """Load queries and qrels of a BEIR folder (local, or a URI downloaded first); queries
    without qrels are left out."""
    data = beir_folder(data)
    if not data.is_dir():
        raise BeirError(f"BEIR folder {data} does not exist")
    corpus = data / "corpus.jsonl"
    if not corpus.is_file():
        raise BeirError(f"{corpus} does not exist")
    qrels = load_qrels(data / "qrels" / f"{split}.tsv")
    queries = {str(q["_id"]): str(q.get("text", "")) for q in _read_jsonl(data / "queries.jsonl")}
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise BeirError(f"{len(missing)} qrels queries are not in queries.jsonl "
                        f"(e.g. {missing[:3]})")
    return Beir(corpus, {q: queries[q] for q in qrels}, qrels)


# --- metrics (pure) -----------------------------------------------------------------------


METRICS = ("ndcg", "mrr", "recall")


def _ranx_metrics(qrels: dict[str, dict[str, int]], run: dict[str, Sequence[str]],
                  cutoffs: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-query nDCG@k, MRR@k, Recall@k from ranx, one array per metric over ``qrels``.

    ranx takes scored runs: the i-th of n ranked documents gets score n - i, so ranx's order
    is exactly the given one (a repeated document keeps its first rank). A query of ``qrels``
    missing from ``run`` is kept with an empty ranking (``make_comparable``) and scores 0.
    """
    import warnings

    from ranx import Qrels, Run, evaluate

    names = [f"{m}@{k}" for m in METRICS for k in cutoffs]
    scored: dict[str, dict[str, float]] = {}
    for q in qrels:
        ranked = run.get(q, [])
        scores: dict[str, float] = {}
        for i, d in enumerate(ranked):
            scores.setdefault(d, float(len(ranked) - i))
        scored[q] = scores
    if not any(scored.values()):  # ranx cannot build a Run with no document at all
        return {name: np.zeros(len(qrels)) for name in names}
    with warnings.catch_warnings():  # numba's first-compile chatter
        warnings.simplefilter("ignore")
        out = evaluate(Qrels({q: dict(r) for q, r in qrels.items()}), Run(scored), names,
                       return_mean=False, make_comparable=True)
    # ranx returns the bare array when asked for a single metric
    return out if isinstance(out, dict) else {names[0]: out}


def query_metrics(rels: dict[str, int], ranked: Sequence[str], cutoffs: Sequence[int]
                  ) -> dict[str, float]:
    """nDCG@k, MRR@k, Recall@k of one ranked list (trec_eval / BEIR definitions, via ranx)."""
    per_query = _ranx_metrics({"q": rels}, {"q": ranked}, cutoffs)
    return {name: float(v[0]) for name, v in per_query.items()}


def evaluate_run(qrels: dict[str, dict[str, int]], run: dict[str, Sequence[str]],
                 cutoffs: Sequence[int] = CUTOFFS) -> dict[str, float]:
    """Mean metrics over the queries of ``qrels`` (a query missing from ``run`` scores 0)."""
    per_query = _ranx_metrics(qrels, run, cutoffs)
    return {name: round(float(np.mean(v)), 5) for name, v in per_query.items()}


def format_table(metrics: dict[str, float], cutoffs: Sequence[int]) -> str:
    """Metrics as a small text table: one row per metric, one column per cutoff."""
    head = "metric  " + "".join(f"{'@' + str(k):>10}" for k in cutoffs)
    lines = [head]
    for m in METRICS:
        lines.append(f"{m:<8}" + "".join(f"{metrics[f'{m}@{k}']:>10.4f}" for k in cutoffs))
    return "\n".join(lines)


# --- the pipeline -------------------------------------------------------------------------


def convert_corpus(corpus: Path, out: Path) -> tuple[list[str], bool]:
    """Write ``{"text": title + " " + text}`` per line (line i = BEIR doc i).

    Returns the BEIR ids (by line) and whether the file was (re)written. Written through a
    temporary file; reused when it is newer than the source.
    """
    ids: list[str] = []
    if out.is_file() and out.stat().st_mtime >= corpus.stat().st_mtime and \
            (out.with_suffix(".ids.json")).is_file():
        return json.loads(out.with_suffix(".ids.json").read_text()), False
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, corpus.open(encoding="utf-8") as src, \
            tmp.open("w", encoding="utf-8") as dst:
        for i, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BeirError(f"{corpus}:{i}: not valid JSON ({exc})") from None
            if "_id" not in doc:
                raise BeirError(f"{corpus}:{i}: document without '_id'")
            text = (str(doc.get("title") or "") + " " + str(doc.get("text") or "")).strip()
            ids.append(str(doc["_id"]))
            dst.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    atomic_write_json(out.with_suffix(".ids.json"), ids)
    return ids, True


def stage_corpus(corpus: Path, run_dir: str) -> tuple[str, list[str], bool]:
    """The converted corpus (:func:`convert_corpus`) where the embed stage reads it: in
    ``run_dir/corpus/``, locally or in the bucket. A URI run_dir gets it converted in this
    machine's storage cache and uploaded when its content differs from the bucket's copy
    (compared by SHA-256, uploaded last). Returns (its location, BEIR ids by line, whether it
    changed, i.e. the store must be re-embedded)."""
    from craft_ray.models.gguf import file_sha256

    if not storage.is_uri(run_dir):
        text_file = Path(run_dir) / "corpus" / "corpus.jsonl"
        ids, rewritten = convert_corpus(corpus, text_file)
        return str(text_file), ids, rewritten
    key = hashlib.sha256(storage.redact(run_dir).encode()).hexdigest()[:16]
    local = storage.cache_root() / "eval-retrieval" / key / "corpus.jsonl"
    ids, _ = convert_corpus(corpus, local)
    digest = file_sha256(local)  # streamed, not the whole corpus in memory
    remote = storage.join(run_dir, "corpus", "corpus.jsonl")
    marker = storage.join(run_dir, "corpus", "corpus.sha256")
    if storage.is_file(marker) and storage.is_file(remote) and \
            storage.read_text(marker).strip() == digest:
        return remote, ids, False
    storage.upload(local, remote)
    storage.write_text(marker, digest + "\n")
    return remote, ids, True


def encode_queries(model_name: str, texts: list[str], batch_size: int,
                   max_seq_length: int | None, embed: EmbedderSettings | None = None,
                   cache_dir: str | Path | None = None) -> np.ndarray:
    """Queries as float32 unit vectors (not rounded to float16, as BEIR keeps them), with
    the same embedder backend as the corpus."""
    from craft_ray.models.embedder import load_sentence_transformer

    embed = embed or EmbedderSettings()
    model = load_sentence_transformer(model_name, None, max_seq_length, False,
                                      backend=embed.backend, quantize=embed.quantize,
                                      cache_dir=cache_dir)
    vec = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vec, dtype=np.float32)


def dense_rankings(cfg: RetrievalEvalConfig, beir: Beir, queries: dict[str, str], k: int
                   ) -> tuple[list[str], dict[str, list[int]], dict[str, Any]]:
    """Embed the corpus (embed stage, resumable) and ``queries``; exact top-``k`` per query.

    Returns the BEIR doc ids by corpus line, each query's ranked corpus line numbers, and
    timings/counts. Ray must be initialised.
    """
    from craft_ray.stages.embed import EmbedConfig, EmbedStageConfig, run_embed
    from craft_ray.stages.embed.stage import model_cache_dir
    from craft_ray.stages.retrieve import ranked_lists, search_store
    from craft_ray.store.corpus import CorpusConfig, parse_doc_id
    from craft_ray.store.vectors import read_info

    t0 = time.time()
    text_file, ids, rewritten = stage_corpus(beir.corpus_path, cfg.run_dir)
    embed_cfg = EmbedStageConfig(run_dir=cfg.run_dir, ray=cfg.ray, embed=EmbedConfig(
        corpora=[CorpusConfig(name="beir", format="jsonl", paths=[text_file],
                              min_chars=0, max_chars=100_000_000)],
        model=cfg.model, max_seq_length=cfg.max_seq_length, export_h5=False,
        batch_size=cfg.embed_batch_size, concurrency=cfg.concurrency,
        num_gpus=cfg.num_gpus, backend=cfg.embed.backend, quantize=cfg.embed.quantize))
    embed_stats = run_embed(embed_cfg, force=rewritten)  # a new corpus file: re-embed
    t_embed = time.time()
    store = storage.join(cfg.run_dir, "embed", "store")
    info = read_info(store)
    qids = list(queries)
    q = encode_queries(cfg.model, [queries[i] for i in qids], cfg.query_batch_size,
                       cfg.max_seq_length, cfg.embed,  # the corpus encoder's export, if any
                       model_cache_dir(embed_cfg.embed, storage.join(cfg.run_dir, "embed")))
    if q.shape[1] != info.dim:
        raise BeirError(f"queries are {q.shape[1]}-dim but the store {storage.redact(store)} "
                        f"is {info.dim}-dim")
    t_q = time.time()
    k = min(k, info.num_rows)
    res = search_store(store, info, q, {"*": (k, 0)}, num_gpus=cfg.num_gpus,
                       concurrency=cfg.concurrency)
    pool = res.pools.get("*")
    run: dict[str, list[int]] = {qid: [] for qid in qids}
    if pool is not None:
        per, _ = ranked_lists(pool, len(qids), k, 0)
        for qi, lst in enumerate(per):
            run[qids[qi]] = [parse_doc_id(str(pool.doc_id[u]))[2] for u in lst]
    info_out = {
        "corpus": len(ids), "embedded": info.num_rows,
        "rejected_docs": embed_stats.get("rejects", {}),
        "seconds": {"embed_corpus": round(t_embed - t0, 2),
                    "embed_queries": round(t_q - t_embed, 2), "search": round(res.seconds, 2)},
    }
    return ids, run, info_out


def run_eval_retrieval(cfg: RetrievalEvalConfig, beir: Beir | None = None) -> dict[str, Any]:
    """Embed a BEIR corpus and its queries, retrieve, score. Ray must be initialised.

    Returns ``{"metrics": {...}, "queries": n, "corpus": n, "seconds": {...}}``.
    """
    t0 = time.time()
    beir = beir or load_beir(cfg.data, cfg.split)
    k = max(cfg.cutoffs) + (1 if cfg.ignore_identical_ids else 0)
    ids, rows, extra = dense_rankings(cfg, beir, beir.queries, k)
    run: dict[str, list[str]] = {}
    for qid, lst in rows.items():
        docs = [ids[r] for r in lst]
        if cfg.ignore_identical_ids:
            docs = [d for d in docs if d != qid]
        run[qid] = docs[: max(cfg.cutoffs)]
    metrics = evaluate_run(beir.qrels, run, cfg.cutoffs)
    extra["seconds"]["total"] = round(time.time() - t0, 2)
    return {"metrics": metrics, "queries": len(beir.queries), **extra}


# --- a BEIR folder from a StackExchange dump ----------------------------------------------


def stackexchange_to_beir(posts_xml: str | Path, out: str | Path, split: str = "test",
                          max_queries: int | None = None, max_docs: int | None = None
                          ) -> dict[str, int]:
    """Build a BEIR folder from a ``Posts.xml``: queries are question titles, the corpus is
    every answer (HTML stripped), and a question's accepted answer has relevance 1.

    ``max_queries`` keeps the first N questions with an accepted answer; ``max_docs`` caps
    the corpus (accepted answers of kept questions are always in it).
    """
    import xml.etree.ElementTree as ET

    from craft_ray.store.stackexchange import html_to_text

    questions: dict[str, dict[str, str]] = {}
    answers: list[dict[str, str]] = []
    for _ev, el in ET.iterparse(str(posts_xml), events=("end",)):
        if el.tag != "row":
            continue
        a = dict(el.attrib)
        el.clear()
        if a.get("PostTypeId") == "1" and a.get("AcceptedAnswerId") and a.get("Title"):
            questions[a["Id"]] = a
        elif a.get("PostTypeId") == "2" and a.get("Body"):
            answers.append(a)
    answer_ids = {a["Id"] for a in answers}
    qs = [q for q in questions.values() if q["AcceptedAnswerId"] in answer_ids]
    qs.sort(key=lambda q: int(q["Id"]))
    if max_queries is not None:
        qs = qs[:max_queries]
    must = {q["AcceptedAnswerId"] for q in qs}
    docs = [a for a in answers if a["Id"] in must]
    others = [a for a in answers if a["Id"] not in must]
    room = len(others) if max_docs is None else max(0, max_docs - len(docs))
    docs += others[:room]
    docs.sort(key=lambda a: int(a["Id"]))
    out = Path(out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as fh:
        for a in docs:
            fh.write(json.dumps({"_id": f"a{a['Id']}", "title": "",
                                 "text": html_to_text(a["Body"])}, ensure_ascii=False) + "\n")
    with (out / "queries.jsonl").open("w", encoding="utf-8") as fh:
        for q in qs:
            fh.write(json.dumps({"_id": f"q{q['Id']}", "text": q["Title"]},
                                ensure_ascii=False) + "\n")
    with (out / "qrels" / f"{split}.tsv").open("w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for q in qs:
            fh.write(f"q{q['Id']}\ta{q['AcceptedAnswerId']}\t1\n")
    return {"queries": len(qs), "corpus": len(docs)}
