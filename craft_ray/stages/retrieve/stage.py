"""Retrieval stage: few-shots -> exact top-k over the embedding store -> corpus samples.

The pipeline::

    few-shots -> embed (driver, the store's model)             Q: [F, dim] float32
    store data files -> SimilarityScorer actors (Ray; a StoreSearcher keeps them for rescans)
                     -> per-shard candidate pools             top-k per few-shot + top-k of mean
    driver: merge pools as they stream in                     bounded memory: never the store
         -> ranked lists -> selection (per_shot | mean | mixed) -> fetch texts by id (Ray Data)
         -> RUN_DIR/retrieve/corpus_samples.parquet (+ .jsonl)

The mean list's score is the product with the few-shots' mean vector (equal to the mean of
their products), one more column of the same matrix product. Each actor keeps per list the k
best scores it has passed on in the search (its *floor*): later entries below it cannot enter
the list and are not passed on, so shard pools shrink as a scan goes.

Exactness: every candidate list is an exact top-k by cosine similarity (dot product of
L2-normalised vectors, computed in float32). Within a shard and during merges every document
whose score ties the k-th score is kept, so no tie is cut arbitrarily; the final cut sorts by
(score descending, doc id ascending). The result is therefore the same as a brute-force sort
of the whole store by (-score, doc_id), whatever the shard layout or chunk size.

Leakage guard: a document whose similarity to any few-shot is >= ``leakage_threshold`` is
removed before ranking (it is most likely the few-shot's own source text) and reported in
``leakage.parquet``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.runtime import StageDir, StageStats, storage
from craft_ray.stages.retrieve.actors import SearchResult, StoreSearcher
from craft_ray.stages.retrieve.config import RetrieveConfig, RetrieveError, RetrieveStageConfig
from craft_ray.stages.retrieve.faiss_index import search_faiss
from craft_ray.stages.retrieve.ranking import Budget, Pool, mode_budget, ranked_lists, split_quota
from craft_ray.stages.retrieve.select import Selected, fetch_docs, select
from craft_ray.store.vectors import StoreInfo, read_info
from craft_ray.tasks.fewshots import FewShot, embed_text, load_fewshots

logger = logging.getLogger(__name__)


# --- checks before any work ---------------------------------------------------------------


def check_store(info: StoreInfo, store: str | Path, model: str | None, dim: int | None) -> str:
    """The model to embed few-shots with; a mismatch with the store is a :class:`RetrieveError`."""
    import pyarrow.parquet as pq

    from craft_ray.models.embedder import resolve_model

    if model is not None and model != info.model and resolve_model(model) != resolve_model(
            info.model):
        raise RetrieveError(
            f"the store {store} was embedded with model {info.model!r} but retrieve.model is "
            f"{model!r}; similarities across models are meaningless. Set retrieve.model to "
            f"{info.model!r} (or omit it), or re-embed the corpora with {model!r}."
        )
    if dim is not None and dim != info.dim:
        raise RetrieveError(
            f"the store {store} holds {info.dim}-dim vectors but retrieve.dim is {dim}; "
            "point retrieve.store at a store built with the intended model"
        )
    if not info.normalized:
        raise RetrieveError(f"the store {store} is not L2-normalised; cosine needs unit vectors")
    for sh in info.shards:
        p = storage.join(store, sh.file)
        if not storage.is_file(p):
            raise RetrieveError(f"store data file {p} is missing; re-run `craft-ray embed`")
        fs, where = storage.filesystem(p)
        width = pq.read_schema(where, filesystem=fs).field("embedding").type.list_size
        if sh.num_rows and width != info.dim:
            raise RetrieveError(
                f"store data file {p} has {width}-dim vectors but store.json says {info.dim}")
    return model or info.model


def corpus_sizes(info: StoreInfo) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for s in info.shards:
        sizes[s.corpus] = sizes.get(s.corpus, 0) + s.num_rows
    return sizes


def plan_budgets(cfg: RetrieveConfig, info: StoreInfo, num_shots: int) -> dict[str, Budget]:
    """Per corpus group: k and list lengths. Errors when k exceeds what the corpora hold."""
    sizes = corpus_sizes(info)
    if cfg.quotas is None:
        total = sum(sizes.values())
        if cfg.k > total:
            raise RetrieveError(
                f"k={cfg.k} is larger than the corpus: the store holds {total} documents "
                f"({sizes}). Lower retrieve.k or embed more corpora."
            )
        return {"*": mode_budget(cfg.mode, cfg.k, num_shots, cfg.oversample)}
    unknown = sorted(set(cfg.quotas) - set(sizes))
    if unknown:
        raise RetrieveError(
            f"quotas name corpora {unknown} that the store does not hold (it has "
            f"{sorted(sizes)})"
        )
    out = {}
    for corpus, kc in split_quota(cfg.k, cfg.quotas).items():
        if kc > sizes[corpus]:
            raise RetrieveError(
                f"quota for corpus {corpus!r} asks for {kc} documents but it holds only "
                f"{sizes[corpus]}; lower k or that corpus' quota"
            )
        if kc:
            out[corpus] = mode_budget(cfg.mode, kc, num_shots, cfg.oversample)
    return out


def embed_fewshots(shots: list[FewShot], template: str, model_name: str, dim: int
                   ) -> np.ndarray:
    """The few-shots as float32 [F, dim] unit vectors, with the store's model."""
    from craft_ray.models.embedder import encode_texts, load_sentence_transformer

    model = load_sentence_transformer(model_name, "cpu", None, False)
    dim_fn = getattr(model, "get_embedding_dimension", None) or \
        model.get_sentence_embedding_dimension
    got = int(dim_fn() or 0)
    if got and got != dim:
        raise RetrieveError(
            f"model {model_name!r} makes {got}-dim vectors but the store holds {dim}-dim "
            "vectors; use the store's model"
        )
    texts = [embed_text(s, template) for s in shots]
    return encode_texts(model, texts, 32).astype(np.float32)

# --- stage runner -------------------------------------------------------------------------


def _grow(b: Budget, size: int) -> Budget:
    """Deeper candidate lists (twice as long, at most the corpus)."""
    return Budget(b.k, min(size, max(b.k_shot * 2, 1)) if b.k_shot else 0,
                  min(size, max(b.k_mean * 2, 1)) if b.k_mean else 0)


def search_and_select(prep: Prepared, cfg: RetrieveConfig, max_rescans: int = 8
                      ) -> tuple[SearchResult, dict[str, list[Selected]], dict[str, Budget], int]:
    """Search the store and select ``k`` documents per corpus group.

    The lists are CRAFT's length (oversampled 1.2x). When few-shots share so many documents
    that the deduplicated union falls short of ``k`` while deeper lists exist, the store is
    scanned again with lists twice as long (logged; counted as ``rescans``).
    """
    with contextlib.ExitStack() as stack:
        searcher = None if cfg.index is not None else stack.enter_context(StoreSearcher(
            prep.store, prep.info, chunk_rows=cfg.chunk_rows, query_block=cfg.query_block,
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, concurrency=cfg.concurrency,
            vector_cache=cfg.vector_cache, cache_dtype=cfg.vector_cache_dtype))
        return _search_and_select(prep, cfg, searcher, max_rescans)


def _search_and_select(prep: Prepared, cfg: RetrieveConfig, searcher: StoreSearcher | None,
                       max_rescans: int
                       ) -> tuple[SearchResult, dict[str, list[Selected]], dict[str, Budget], int]:
    budgets = dict(prep.budgets)
    sizes = corpus_sizes(prep.info)
    rescans = 0
    spent = scanned = 0.0  # over every scan of the store, rescans included
    while True:
        if searcher is None:
            b = budgets["*"]
            res = search_faiss(prep.store, prep.info, cfg.index, prep.queries, b.k_shot,
                               b.k_mean, cfg.leakage_threshold)
        else:  # rescans reuse the same actors
            res = searcher.search(
                prep.queries, {g: (b.k_shot, b.k_mean) for g, b in budgets.items()},
                leakage_threshold=cfg.leakage_threshold,
                corpora=None if cfg.quotas is None else list(budgets))
        chosen: dict[str, list[Selected]] = {}
        short: list[str] = []
        for group, b in sorted(budgets.items()):
            pool = res.pools.get(group, Pool())
            per_shot, mean = ranked_lists(pool, len(prep.shots), b.k_shot, b.k_mean)
            chosen[group] = select(cfg.mode, b.k, per_shot, mean)
            full = any(len(p) == b.k_shot for p in per_shot) or (b.k_mean and
                                                                   len(mean) == b.k_mean)
            size = sum(sizes.values()) if group == "*" else sizes[group]
            if len(chosen[group]) < b.k and full and max(b.k_shot, b.k_mean) < size:
                short.append(group)
            elif len(chosen[group]) < b.k:
                logger.warning("retrieve: only %d of %d documents available for %s (after "
                               "the leakage guard)", len(chosen[group]), b.k, group)
        spent += res.seconds
        scanned += res.scan_seconds
        if not short or rescans >= max_rescans:
            res.seconds, res.scan_seconds = spent, scanned
            return res, chosen, budgets, rescans
        rescans += 1
        for group in short:
            size = sum(sizes.values()) if group == "*" else sizes[group]
            logger.info("retrieve: %s: %d of %d after dedup (few-shots share documents); "
                        "rescanning with longer lists", group, len(chosen[group]),
                        budgets[group].k)
            budgets[group] = _grow(budgets[group], size)


def _samples_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("doc_id", pa.string()), ("corpus", pa.string()), ("text", pa.string()),
        ("metadata", pa.string()), ("score", pa.float64()),
        ("fewshot_ids", pa.list_(pa.string())), ("fewshot_ranks", pa.list_(pa.int64())),
        ("selected_by", pa.string()), ("mean_score", pa.float64()),
        ("mean_rank", pa.int64()),
    ])


@dataclass
class Prepared:
    """Everything checked and computed before Ray starts: store, few-shots, budgets, queries."""

    store: str
    info: StoreInfo
    shots: list[FewShot]
    model: str
    budgets: dict[str, Budget]
    queries: np.ndarray


def prepare_retrieve(stage_cfg: RetrieveStageConfig, *, base_dir: str | Path | None = None,
                     queries: np.ndarray | None = None) -> Prepared:
    """Check every input (few-shots, store, model, dim, k, quotas) and embed the few-shots.

    Needs no Ray, so a bad input fails in seconds with one clear message. ``queries``
    replaces the few-shot embeddings (tests and benchmarks).
    """
    cfg = stage_cfg.retrieve
    store = cfg.store or storage.join(stage_cfg.run_dir, "embed", "store")
    info = read_info(store)
    shots = load_fewshots(cfg.fewshots, base_dir)
    model = check_store(info, store, cfg.model, cfg.dim)
    budgets = plan_budgets(cfg, info, len(shots))
    if queries is None:
        queries = embed_fewshots(shots, cfg.fewshots.embed_template, model, info.dim)
    elif queries.shape != (len(shots), info.dim):
        raise RetrieveError(f"queries have shape {queries.shape}, expected "
                            f"({len(shots)}, {info.dim})")
    return Prepared(store, info, shots, model, budgets, np.asarray(queries, np.float32))


def _selected_rows(chosen: dict[str, list[Any]], res: Any, shots: list[Any]
                   ) -> list[dict[str, Any]]:
    """One row per selected document, with the few-shots it was picked for and its ranks."""
    rows: list[dict[str, Any]] = []
    for group, picks in sorted(chosen.items()):
        pool = res.pools.get(group, Pool())
        for c in picks:
            ids = [shots[i].id for i in c.shots] if c.shots else [s.id for s in shots]
            ranks = c.shot_ranks if c.shots else [int(c.mean_rank or 0)] * len(shots)
            rows.append({"doc_id": str(pool.doc_id[c.u]), "score": float(pool.max_sim[c.u]),
                         "fewshot_ids": ids, "fewshot_ranks": ranks,
                         "selected_by": c.selected_by,
                         "mean_score": float(pool.mean_sim[c.u]), "mean_rank": c.mean_rank,
                         "_row": int(pool.row[c.u]), "_len": int(pool.text_len[c.u])})
    return rows


def _with_texts(rows: list[dict[str, Any]], info: Any, cfg: RetrieveConfig, stats: StageStats
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """(rows with their texts, best first; rejects with reasons; fetch start time)."""
    from craft_ray.store.corpus import parse_doc_id

    wanted = []
    for r in rows:
        corpus, shard, row = parse_doc_id(r["doc_id"])
        r["corpus"] = corpus
        wanted.append((corpus, shard, row, r["_len"]))
    t_fetch = time.time()
    texts = fetch_docs(info, wanted, cfg.fetch_num_cpus)
    good, rejects = [], []
    for r in rows:
        got = texts.get(r["doc_id"], {"text": None, "metadata": None,
                                      "reject_reason": "not_fetched"})
        r.pop("_row")
        r.pop("_len")
        if got["reject_reason"]:
            stats.rejects[got["reject_reason"]] += 1
            rejects.append({"doc_id": r["doc_id"], "reject_reason": got["reject_reason"]})
            continue
        r["text"], r["metadata"] = got["text"], got["metadata"]
        good.append(r)
    good.sort(key=lambda r: (-r["score"], r["doc_id"]))
    return good, rejects, t_fetch


def _write_outputs(out_dir: str, good: list[dict[str, Any]], rejects: list[dict[str, Any]],
                   leak_rows: list[dict[str, Any]], write_jsonl: bool) -> None:
    """corpus_samples.parquet (+ .jsonl), leakage.parquet and rejects.parquet, atomically."""
    import pyarrow as pa

    schema = _samples_schema()
    table = pa.Table.from_pylist(good, schema=schema)
    storage.write_parquet(storage.join(out_dir, "corpus_samples.parquet"), table)
    if write_jsonl:
        with storage.write_once(storage.join(out_dir, "corpus_samples.jsonl")) as tmpj, \
                open(tmpj, "w", encoding="utf-8") as fh:
            for r in good:
                fh.write(json.dumps({k: r[k] for k in schema.names}, ensure_ascii=False) + "\n")
    _write_small_parquet(storage.join(out_dir, "leakage.parquet"), leak_rows,
                         [("doc_id", pa.string()), ("fewshot_id", pa.string()),
                          ("similarity", pa.float64())])
    _write_small_parquet(storage.join(out_dir, "rejects.parquet"), rejects,
                         [("doc_id", pa.string()), ("reject_reason", pa.string())])


def run_retrieve(stage_cfg: RetrieveStageConfig, *, force: bool = False,
                 base_dir: str | Path | None = None,
                 prepared: Prepared | None = None) -> dict[str, Any]:
    """Run the retrieval stage (Ray must be initialised). Returns the stage's stats.

    Every check runs (in :func:`prepare_retrieve`) before any similarity is computed.
    """
    cfg = stage_cfg.retrieve
    stage = StageDir(stage_cfg.run_dir, "retrieve")
    if not force and stage.is_complete(cfg):
        logger.info("retrieve: already complete in %s (same config); skipping",
                    storage.redact(stage.location))
        return stage.read_stats()
    prep = prepared or prepare_retrieve(stage_cfg, base_dir=base_dir)
    store, info, shots, model = prep.store, prep.info, prep.shots, prep.model
    stage.begin(cfg)
    stats = StageStats("retrieve")
    logger.info("retrieve: %d few-shots, mode=%s, k=%d over %d documents in %s",
                len(shots), cfg.mode, cfg.k, info.num_rows, store)

    res, chosen, budgets, rescans = search_and_select(prep, cfg)
    if res.n_leaked:
        logger.warning("retrieve: leakage guard removed %d documents with similarity >= %s "
                       "to a few-shot", res.n_leaked, cfg.leakage_threshold)
    good, rejects, t_fetch = _with_texts(_selected_rows(chosen, res, shots), info, cfg, stats)
    leak_rows = [{"doc_id": d["doc_id"], "fewshot_id": shots[d["shot"]].id,
                  "similarity": d["similarity"]} for d in res.leaked]
    _write_outputs(stage.location, good, rejects, leak_rows, cfg.write_jsonl)
    stats.rows_in = res.num_rows
    stats.rows_out = len(good)
    stats.rejects["leakage"] += res.n_leaked
    by = {m: sum(1 for r in good if r["selected_by"] == m) for m in ("per_shot", "mean", "both")}
    per_corpus: dict[str, int] = {}
    for r in good:
        per_corpus[r["corpus"]] = per_corpus.get(r["corpus"], 0) + 1
    stats.extra = {
        "store": str(store), "model": model, "mode": cfg.mode, "k": cfg.k,
        "fewshots": len(shots), "search_seconds": round(res.seconds, 3),
        "actor_scan_seconds": round(res.scan_seconds, 3),
        "fetch_seconds": round(time.time() - t_fetch, 3),
        "docs_scanned_per_s": (round(res.num_rows * (rescans + 1) / res.seconds, 1)
                               if res.seconds else None),
        "selected_by": by, "per_corpus": per_corpus,
        "budgets": {g: vars(b) for g, b in budgets.items()}, "rescans": rescans,
        "score_min": min((r["score"] for r in good), default=None),
        "score_max": max((r["score"] for r in good), default=None),
    }
    return stage.finish(cfg, stats)


def _write_small_parquet(path: str, rows: list[dict[str, Any]], fields: list[Any]) -> None:
    import pyarrow as pa

    storage.write_parquet(path, pa.Table.from_pylist(rows, schema=pa.schema(fields)))
