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
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from craft_ray.config import RayConfig, StrictModel
from craft_ray.fewshots import FewShot, FewShotConfig, embed_text, load_fewshots
from craft_ray.runtime import StageDir, StageStats, tmp_path_for
from craft_ray.store import StoreError, StoreInfo, read_info

logger = logging.getLogger(__name__)

Mode = Literal["per_shot", "mean", "mixed"]

# Row `q` of a candidate entry for the list of the mean similarity (per-shot lists use 0..F-1).
MEAN = -1
# Rows converted from float16 at a time on CPU: 4,096 x 384 float32 is 6 MiB, cache-sized.
CAST_ROWS = 4096


class RetrieveError(ValueError):
    """Retrieval cannot start: bad few-shots, store, k or quotas (message says how to fix)."""


class IndexConfig(StrictModel):
    """Optional FAISS index built once from the store, for stores queried repeatedly."""

    kind: Literal["flat", "ivf", "hnsw"] = Field(
        default="flat",
        description="flat: exact inner product (IndexFlatIP); ivf: IndexIVFFlat "
        "(approximate, nlist/nprobe); hnsw: IndexHNSWFlat (approximate, M/efSearch).",
    )
    nlist: int = Field(default=1024, ge=1, description="ivf: number of clusters.")
    nprobe: int = Field(default=32, ge=1, description="ivf: clusters visited per query.")
    train_size: int = Field(default=100_000, ge=1,
                            description="ivf: vectors (first of the store) to train on.")
    hnsw_m: int = Field(default=32, ge=4, le=256, description="hnsw: graph degree M.")
    ef_search: int = Field(default=256, ge=1, description="hnsw: efSearch.")
    ef_construction: int = Field(default=200, ge=1, description="hnsw: efConstruction.")
    leak_margin: int = Field(
        default=64, ge=0,
        description="Extra hits fetched per list so documents removed by the leakage guard "
        "can be replaced.",
    )


class RetrieveConfig(StrictModel):
    """Config of ``craft-ray retrieve``."""

    fewshots: FewShotConfig = Field(description="The task's few-shots (CRAFT jsonl or any).")
    k: int = Field(
        default=1000, ge=1, le=100_000_000,
        description="Documents to retrieve in total (CRAFT: the target dataset size, e.g. "
        "25k for L).",
    )
    mode: Mode = Field(
        default="mixed",
        description="per_shot: k/F from each few-shot's own ranking; mean: top-k of the mean "
        "similarity over all few-shots; mixed (CRAFT): half from each, deduplicated.",
    )
    oversample: float = Field(
        default=1.2, ge=1.0, le=10.0,
        description="Candidate lists are this much longer than their share of k, to absorb "
        "documents selected twice (CRAFT: 1.2).",
    )
    leakage_threshold: float | None = Field(
        default=0.98, gt=-1.0, le=1.0,
        description="Drop documents whose cosine similarity to any few-shot is >= this "
        "(a few-shot's own source text). null disables the guard.",
    )
    quotas: dict[str, float] | None = Field(
        default=None,
        description="Optional fixed mix: fraction of k per corpus (must sum to 1; corpora not "
        "named are not searched). Default: all corpora compete together.",
    )
    store: str | None = Field(
        default=None, description="Embedding store (default RUN_DIR/embed/store)."
    )
    model: str | None = Field(
        default=None,
        description="Embedding model for the few-shots. Must be the store's model (default: "
        "the model recorded in the store).",
    )
    dim: int | None = Field(
        default=None, ge=1, description="Expected vector dimension (checked against the store)."
    )
    chunk_rows: int = Field(
        default=32_768, ge=1, le=10_000_000,
        description="Store rows per similarity matmul inside an actor (memory ~ rows * dim * 6 "
        "bytes).",
    )
    query_block: int = Field(
        default=256, ge=1, le=65_536,
        description="Queries per matmul (bounds the [queries, rows] score block).",
    )
    num_gpus: float = Field(
        default=0.0, ge=0, description="GPUs per similarity actor (fp16 torch matmul when > 0)."
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per similarity actor.")
    concurrency: int = Field(default=1, ge=1, le=10_000, description="Similarity actors.")
    fetch_num_cpus: float = Field(
        default=0.5, gt=0, description="CPUs per task fetching documents back from a shard."
    )
    write_jsonl: bool = Field(default=True, description="Also write corpus_samples.jsonl.")
    index: IndexConfig | None = Field(
        default=None,
        description="Search a FAISS index built from the store (STORE/_faiss, built on first "
        "use, reused while the store is unchanged) instead of streaming the store through "
        "similarity actors. Default: exact streaming search.",
    )
    vector_cache: bool = Field(
        default=False,
        description="Keep a raw copy of each store shard in STORE/_vector_cache that later "
        "retrievals memory-map instead of decoding Parquet; worth it when the store is "
        "queried repeatedly (several tasks, rescans). See vector_cache_dtype for its size.",
    )
    vector_cache_dtype: Literal["auto", "float16", "float32"] = Field(
        default="auto",
        description="The cache's dtype. float32 (2x the store on disk) spares CPU actors "
        "converting every vector from float16, which costs more than the product itself; "
        "float16 (= the store) suits GPU actors. auto: float32 on CPU, float16 on GPU.",
    )

    @field_validator("quotas")
    @classmethod
    def _quotas(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("quotas is empty; omit it to let all corpora compete")
        if any(not (0 < f <= 1) for f in v.values()):
            raise ValueError(f"every quota must be a fraction in (0, 1]; got {v}")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"quotas must sum to 1 (got {sum(v.values()):.6f}): {v}")
        return v

    @model_validator(mode="after")
    def _k_vs_quotas(self) -> RetrieveConfig:
        if self.quotas and self.k < len(self.quotas):
            raise ValueError(f"k={self.k} is smaller than the number of quota corpora")
        if self.quotas and self.index is not None:
            raise ValueError("quotas work with the streaming search only; drop retrieve.index")
        return self


class RetrieveStageConfig(StrictModel):
    """A YAML file for ``craft-ray retrieve``: common keys plus the ``retrieve`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    retrieve: RetrieveConfig


# --- budgets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How long each candidate list of one corpus group is, and how many docs to select."""

    k: int          # documents to select
    k_shot: int     # length of each few-shot's list (0: no per-shot lists)
    k_mean: int     # length of the mean list (0: no mean list)


def mode_budget(mode: Mode, k: int, num_shots: int, oversample: float = 1.2) -> Budget:
    """List lengths for a mode (CRAFT's mixed: ``int(k / 2 * 1.2)`` mean, that // F per shot).

    per-shot lists get at least one document each; lists are oversampled so that documents
    chosen twice can be replaced and the selection still reaches ``k``.
    """
    if mode == "mean":
        return Budget(k, 0, k)
    if mode == "per_shot":
        return Budget(k, max(1, math.ceil(k * oversample / num_shots)), 0)
    half = max(1, int(k / 2 * oversample))
    return Budget(k, max(1, math.ceil(half / num_shots)), half)


def split_quota(k: int, quotas: dict[str, float]) -> dict[str, int]:
    """Split ``k`` by fractions (largest remainder, ties by corpus name): sums to ``k``."""
    raw = {c: k * f for c, f in quotas.items()}
    out = {c: int(math.floor(v)) for c, v in raw.items()}
    rest = k - sum(out.values())
    for c in sorted(raw, key=lambda c: (-(raw[c] - out[c]), c))[:rest]:
        out[c] += 1
    return out


# --- candidate pools (pure numpy; the core of the exact top-k) ---------------------------


@dataclass
class Pool:
    """Candidate entries of one or more shards.

    Entries are flat arrays: list id ``q`` (0..F-1 a few-shot's list, ``MEAN`` the mean
    list), ``u`` (index into the document arrays) and ``score`` (the list's ranking score).
    Documents: ``doc_id``, ``row``, ``text_len``, ``max_sim`` (max over few-shots),
    ``mean_sim`` (mean over few-shots).
    Invariant after :meth:`reduce`: every list keeps its top ``k`` entries plus every entry
    tying the k-th score, so merging reduced pools never loses a member of the exact top-k.
    """

    q: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    u: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    doc_id: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    text_len: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    max_sim: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    mean_sim: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __len__(self) -> int:
        return int(self.q.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_id.shape[0])

    def reduce(self, k_shot: int, k_mean: int, floors: np.ndarray | None = None) -> Pool:
        """Keep, per list, the entries scoring >= its k-th score; drop unreferenced docs.

        ``floors`` ([F + 1], the mean list last; see :class:`Floors`) first drops entries
        below their list's floor, which spares sorting them.
        """
        if len(self) == 0:
            return self
        q, u, score = self.q, self.u, self.score
        if floors is not None:
            num_shots = len(floors) - 1
            above = score >= floors[np.where(q == MEAN, num_shots, q)]
            q, u, score = q[above], u[above], score[above]
        keep = _keep_topk_with_ties(q, score, k_shot, k_mean)
        q, u, score = q[keep], u[keep], score[keep]
        used, inv = np.unique(u, return_inverse=True)
        return Pool(q, inv.astype(np.int64), score, self.doc_id[used], self.row[used],
                    self.text_len[used], self.max_sim[used], self.mean_sim[used])

    @staticmethod
    def concat(pools: Sequence[Pool], distinct_docs: bool = False) -> Pool:
        """Concatenate pools; a document present in several (a retried shard) is kept once.

        ``distinct_docs``: the caller guarantees no document is in two pools (pools of
        different shards), which skips the deduplication (a sort of every doc id).
        """
        pools = [p for p in pools if p.num_docs]
        if not pools:
            return Pool()
        offsets = np.cumsum([0] + [p.num_docs for p in pools[:-1]])
        doc_id = np.concatenate([p.doc_id for p in pools])
        q = np.concatenate([p.q for p in pools])
        u = np.concatenate([p.u + o for p, o in zip(pools, offsets)])
        score = np.concatenate([p.score for p in pools])
        docs = [np.concatenate([getattr(p, a) for p in pools])
                for a in ("row", "text_len", "max_sim", "mean_sim")]
        if distinct_docs:
            return Pool(q.astype(np.int32), u.astype(np.int64), score.astype(np.float32),
                        doc_id, *docs)
        uniq, first, inv = np.unique(doc_id.astype(str), return_index=True, return_inverse=True)
        if len(uniq) != len(doc_id):
            u = inv[u]
            # The same (q, doc) pair from two copies of a shard: keep one entry.
            pair = q.astype(np.int64) * (len(uniq) + 1) + u
            _, once = np.unique(pair, return_index=True)
            once.sort()
            q, u, score = q[once], u[once], score[once]
            doc_id = doc_id[first]
            docs = [d[first] for d in docs]
        return Pool(q.astype(np.int32), u.astype(np.int64), score.astype(np.float32), doc_id,
                    *docs)


def _keep_topk_with_ties(q: np.ndarray, score: np.ndarray, k_shot: int, k_mean: int
                         ) -> np.ndarray:
    """Boolean mask: entries scoring >= the k-th best score of their list (ties kept)."""
    order = np.lexsort((-score, q))
    qs, ss = q[order], score[order]
    starts = np.flatnonzero(np.r_[True, qs[1:] != qs[:-1]])
    sizes = np.diff(np.r_[starts, len(qs)])
    lists = qs[starts]
    ks = np.where(lists == MEAN, k_mean, k_shot)
    thr = np.where(sizes > ks, ss[starts + np.minimum(ks, sizes) - 1], -np.inf)
    thr = np.where(ks <= 0, np.inf, thr)
    thr_of = np.repeat(thr, sizes)
    keep_sorted = ss >= thr_of
    keep = np.zeros(len(q), dtype=bool)
    keep[order] = keep_sorted
    return keep


def ranked_lists(pool: Pool, num_shots: int, k_shot: int, k_mean: int
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """Exact per-few-shot and mean rankings: doc indices sorted by (score desc, doc id).

    Returns ``(per_shot, mean)``: ``per_shot[i]`` holds at most ``k_shot`` doc indices of
    few-shot i, ``mean`` at most ``k_mean``.
    """
    if len(pool) == 0:
        return [np.zeros(0, np.int64) for _ in range(num_shots)], np.zeros(0, np.int64)
    id_rank = np.empty(pool.num_docs, dtype=np.int64)
    id_rank[np.argsort(pool.doc_id.astype(str), kind="stable")] = np.arange(pool.num_docs)
    order = np.lexsort((id_rank[pool.u], -pool.score, pool.q))
    qs, us = pool.q[order], pool.u[order]
    per_shot = []
    for i in range(num_shots):
        per_shot.append(us[qs == i][:k_shot])
    mean = us[qs == MEAN][:k_mean]
    return per_shot, mean


# --- per-chunk scoring (plain functions, used by the actors) ------------------------------


class Floors:
    """Per list, the ``k`` best scores a scanner has passed on so far in one search (scores
    only); the k-th of them is the list's *floor*.

    Every entry passed on reaches the driver's merge, so the list's global top k holds k
    entries scoring >= its floor: a later entry scoring below it cannot enter the list and
    need not be passed on. Lists 0..F-1 are the few-shots' (length ``k_shot``), list F the
    mean list (``k_mean``).
    """

    def __init__(self, num_shots: int, k_shot: int, k_mean: int) -> None:
        self.top = [np.full((num_shots, k_shot), -np.inf, np.float32),
                    np.full((1, k_mean), -np.inf, np.float32)]

    def values(self) -> np.ndarray:
        """The floors, [num_shots + 1]; -inf until a list has seen k scores."""
        return np.concatenate([t.min(axis=1) if t.shape[1] else
                               np.full(t.shape[0], -np.inf, np.float32) for t in self.top])

    def update(self, q: np.ndarray, score: np.ndarray) -> None:
        """Take the scores of entries just passed on (``q``: list ids, MEAN for the mean)."""
        is_mean = q == MEAN
        for i, (rows, sc) in enumerate(((q[~is_mean], score[~is_mean]),
                                        (np.zeros(int(is_mean.sum()), np.int64),
                                         score[is_mean]))):
            top = self.top[i]
            if not len(rows) or not top.shape[1]:
                continue
            order = np.argsort(rows, kind="stable")
            rows, sc = rows[order], sc[order]
            counts = np.bincount(rows, minlength=top.shape[0])
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            m = int(counts.max())
            pad = np.full((top.shape[0], m), -np.inf, np.float32)
            pad[rows, np.arange(len(rows)) - starts[rows]] = sc
            # the k largest of (the k kept, the new ones)
            self.top[i] = np.partition(np.concatenate([top, pad], axis=1), m, axis=1)[:, m:]


def _block_entries(s: np.ndarray, lo: int, ks: np.ndarray, floors: np.ndarray | None,
                   exclude: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries of one block of lists: ``(list, row, score)`` for every row scoring >= its
    list's k-th largest finite score in the block (ties kept) and >= the list's floor.

    ``s`` is [rows, lists lo..lo+b-1], ``ks`` each list's length, ``floors`` every list's
    floor (see :class:`Floors`; None: none yet), ``exclude`` rows that may not enter any
    list (the leakage guard). A list whose floor is set needs one comparison pass; the
    others take the block's own k-th score (a partition).
    """
    n, b = s.shape
    thr = np.full(b, -np.inf, np.float32) if floors is None else \
        np.asarray(floors[lo:lo + b], np.float32).copy()
    todo = np.flatnonzero(np.isneginf(thr) & (ks > 0) & (ks < n))
    if len(todo):
        # rows x lists is the faster product layout, but a partition along rows is ~10x
        # faster on the transposed copy of the few columns that need one
        sub = np.ascontiguousarray(s[:, todo].T)
        if exclude is not None:
            sub[:, exclude] = -np.inf
        for kv in np.unique(ks[todo]):
            idx = np.flatnonzero(ks[todo] == kv)
            thr[todo[idx]] = np.partition(sub[idx], n - kv, axis=1)[:, n - kv]
    thr = np.where(ks <= 0, np.inf, thr).astype(np.float32)
    mask = s >= thr[None, :]
    if exclude is not None:
        mask[exclude] = False
    r, c = np.divmod(np.flatnonzero(mask), b)  # ~5x faster than a 2-d nonzero
    sc = s[r, c]
    if np.isneginf(thr).any():  # lists longer than the block admit every finite score
        fin = np.isfinite(sc)
        r, c, sc = r[fin], c[fin], sc[fin]
    return c + lo, r, sc


@dataclass
class ChunkScores:
    """Entries of one chunk: (q, pos within shard, score), plus per-doc max/mean similarity."""

    q: np.ndarray
    pos: np.ndarray
    score: np.ndarray
    max_sim: np.ndarray   # per chunk row (at least the candidates' rows are set)
    mean_sim: np.ndarray  # per chunk row (same)
    leaked: np.ndarray    # chunk rows removed by the leakage guard
    leaked_shot: np.ndarray
    leaked_sim: np.ndarray


def score_chunk(sims_fn: Any, num_shots: int, n: int, offset: int, k_shot: int, k_mean: int,
                leakage_threshold: float | None, query_block: int,
                floors: np.ndarray | None = None) -> ChunkScores:
    """Candidates of one chunk of ``n`` store rows starting at shard position ``offset``.

    Lists 0..F-1 are the few-shots', list F the mean similarity over all few-shots (the
    product with the few-shots' mean vector, which equals the mean of their products).
    ``sims_fn(lo, hi)`` returns the float32 [n, hi-lo] scores of lists lo..hi-1; blocks of
    ``query_block`` lists bound memory. ``floors`` ([F + 1]) skips entries that cannot enter
    their list (see :class:`Floors`).
    """
    num_lists = num_shots + 1
    ks = np.full(num_lists, k_shot, dtype=np.int64)
    ks[num_shots] = k_mean
    single = num_lists <= query_block
    need_leak = leakage_threshold is not None
    best = np.full(n, -np.inf, dtype=np.float32)  # max over few-shots
    best_shot = np.zeros(n, dtype=np.int64)
    mean = np.full(n, np.nan, dtype=np.float32)
    leak = np.zeros(n, dtype=bool)
    kept: list[tuple[int, np.ndarray]] = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    s = np.zeros((n, 0), np.float32)
    for lo in range(0, num_lists, query_block):
        hi = min(num_lists, lo + query_block)
        s = sims_fn(lo, hi)
        ns = max(0, min(hi, num_shots) - lo)  # few-shot columns of this block
        if need_leak and ns:
            rows = np.unique(np.nonzero(s[:, :ns] >= leakage_threshold)[0])
            if len(rows):
                top = s[rows, :ns].max(axis=1)
                up = top > best[rows]
                best[rows[up]] = top[up]
                best_shot[rows[up]] = s[rows[up], :ns].argmax(axis=1) + lo
                leak[rows] = True
        if not single:  # every row's max and mean: the candidates' are not known yet
            if ns:
                best = np.maximum(best, s[:, :ns].max(axis=1))
            if hi > num_shots:
                mean = s[:, num_shots - lo].copy()
        if need_leak:
            kept.append((lo, s))  # kept until the leakage mask is known
        else:
            parts.append(_block_entries(s, lo, ks[lo:hi], floors))
    for lo, blk in kept:
        parts.append(_block_entries(blk, lo, ks[lo:lo + blk.shape[1]], floors,
                                    leak if leak.any() else None))
    q = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    pos = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    score = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.float32)
    if single and len(pos):  # the one block holds every list: only the candidates' values
        cand = np.unique(pos)
        if num_shots:
            best[cand] = s[cand, :num_shots].max(axis=1)
        mean[cand] = s[cand, num_shots]
    q = np.where(q == num_shots, MEAN, q)
    leaked = np.flatnonzero(leak)
    return ChunkScores(q.astype(np.int32), pos.astype(np.int64) + offset,
                       score.astype(np.float32), best, mean, leaked + offset,
                       best_shot[leaked], best[leaked])


CacheDtype = Literal["auto", "float16", "float32"]


def _cache_stem(cache_dir: str, path: str) -> Path:
    """The vector cache's name prefix for one data file (its stem and a hash of its path)."""
    import hashlib

    tag = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(path).stem}-{tag}"


def _cache_file(cache_dir: str, path: str, dtype: str = "float16") -> Path:
    stem = _cache_stem(cache_dir, path)
    return stem.with_name(f"{stem.name}.{'f32' if dtype == 'float32' else 'f16'}.npy")


def iter_vectors(pf: Any, path: str, chunk_rows: int, dim: int, cache_dir: str | None,
                 cache_dtype: str = "float16") -> Iterator[np.ndarray]:
    """The vectors of one data file in chunks of ``chunk_rows`` (float16 as stored, or
    float32 when read from a float32 cache).

    With ``cache_dir``, the first scan also writes a raw copy (``.npy`` of ``cache_dtype``,
    through a temporary file and a rename) that later scans memory-map: decoding Parquet's
    nested list column costs far more than the similarity product itself, and on CPU a
    float32 copy also saves converting every vector from float16 (which costs more than
    the product; float16 to float32 is exact, so scores are unchanged). A copy older than
    its data file is ignored.
    """
    cached = _cache_file(cache_dir, path, cache_dtype) if cache_dir else None
    if cached is not None and cached.is_file() and \
            cached.stat().st_mtime >= os.stat(path).st_mtime:
        arr = np.load(cached, mmap_mode="r")
        if arr.shape[1] != dim:
            raise StoreError(f"{cached}: cached vectors have dim {arr.shape[1]}, queries {dim}")
        for i in range(0, arr.shape[0], chunk_rows):
            yield arr[i:i + chunk_rows]  # a view of the mapped file: rows are contiguous
        return
    out = None
    tmp = None
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(cached)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(cache_dtype),
                                        shape=(pf.metadata.num_rows, dim))
    off = 0
    for batch in pf.iter_batches(batch_size=chunk_rows, columns=["embedding"]):
        col = batch.column(0)
        if col.type.list_size != dim:
            raise StoreError(f"{path}: vectors have dim {col.type.list_size}, queries {dim}")
        vec = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        if out is not None:
            out[off:off + len(vec)] = vec
        off += len(vec)
        yield vec
    if out is not None and tmp is not None:
        out.flush()
        del out
        os.replace(tmp, cached)


_META = ("doc_id", "row", "text_len")


def read_meta(pf: Any, path: str, cache_dir: str | None, positions: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``doc_id``, ``row`` and ``text_len`` of the rows at ``positions`` of one data file.

    With ``cache_dir`` (the vector cache), the three columns are also kept there as ``.npy``
    (doc ids as fixed-width unicode), so later scans take the few rows they need from
    memory-mapped arrays instead of decoding every doc id of the file.
    """
    stem = _cache_stem(cache_dir, path) if cache_dir else None
    files = {c: stem.with_name(f"{stem.name}.{c}.npy") for c in _META} if stem else {}
    mtime = os.stat(path).st_mtime
    if files and all(f.is_file() and f.stat().st_mtime >= mtime for f in files.values()):
        cols = [np.load(files[c], mmap_mode="r") for c in _META]
        return cols[0][positions], cols[1][positions], cols[2][positions]
    table = pf.read(columns=list(_META))
    if files:
        for c, f in files.items():
            col = table.column(c).to_numpy(zero_copy_only=False)
            tmp = tmp_path_for(f)
            with open(tmp, "wb") as fh:
                np.save(fh, col.astype(str) if c == "doc_id" else col)
            os.replace(tmp, f)
    meta = table.take(positions)
    return (meta.column("doc_id").to_numpy(zero_copy_only=False),
            meta.column("row").to_numpy(), meta.column("text_len").to_numpy())


class ShardScanner:
    """Scans store data files in chunks and keeps each file's reduced candidate pool.

    Plain Python (testable without Ray); :class:`SimilarityScorer` wraps it as an actor. One
    scanner serves one search: it remembers each list's floor (the k-th score it already
    holds) across chunks and files, so later chunks only pass on entries that can still
    enter a list. A file's pool therefore depends on what the scanner saw before, but it
    always holds every entry of the file that belongs to a global top k (ties kept), which
    is all the driver's merge needs.
    """

    def __init__(self, queries: np.ndarray, leakage_threshold: float | None, chunk_rows: int,
                 query_block: int, device: str = "cpu", max_leaked: int = 10_000,
                 vector_cache: str | None = None, cache_dtype: CacheDtype = "auto") -> None:
        self.vector_cache = vector_cache
        self.cache_dtype = cache_dtype if cache_dtype != "auto" else \
            ("float32" if device == "cpu" else "float16")
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        # The lists' vectors: the few-shots, then their mean (the mean similarity is the
        # product with the mean vector), as columns: rows x lists is the faster layout.
        lists = np.vstack([self.queries, self.queries.mean(axis=0, keepdims=True)])
        self.lists_t = np.ascontiguousarray(lists.T)
        self.leakage_threshold = leakage_threshold
        self.chunk_rows = chunk_rows
        self.query_block = query_block
        self.device = device
        self.max_leaked = max_leaked
        self.floors: dict[tuple[str, int, int], Floors] = {}
        self._q_gpu = None
        self._buf: np.ndarray | None = None
        if device != "cpu":
            import torch

            self._q_gpu = torch.from_numpy(lists).to(device).half()

    def _sims_fn(self, vec: np.ndarray) -> Any:
        if self._q_gpu is not None:
            import torch

            host = vec if vec.flags.writeable else np.array(vec)  # torch wants writable
            x = torch.from_numpy(host).to(self.device, non_blocking=True).half()

            def gpu(lo: int, hi: int) -> np.ndarray:
                return (x @ self._q_gpu[lo:hi].T).float().cpu().numpy()

            return gpu
        if vec.dtype == np.float32:
            def cpu32(lo: int, hi: int) -> np.ndarray:
                return np.matmul(vec, self.lists_t[:, lo:hi])

            return cpu32
        # numpy's float16 matmul is ~100x slower than float32, and converting a whole chunk
        # first costs ~3x the product (it streams the float32 copy through memory). So the
        # rows are converted CAST_ROWS at a time into a buffer that stays in cache, and each
        # block's product is written straight into the output: about 2x faster overall.
        def cpu(lo: int, hi: int) -> np.ndarray:
            n = vec.shape[0]
            out = np.empty((n, hi - lo), dtype=np.float32)
            lt = self.lists_t[:, lo:hi]
            buf = self._cast_buffer(vec.shape[1])
            for r in range(0, n, CAST_ROWS):
                m = min(CAST_ROWS, n - r)
                b = buf[:m]
                b[...] = vec[r:r + m]
                np.matmul(b, lt, out=out[r:r + m])
            return out

        return cpu

    def _cast_buffer(self, dim: int) -> np.ndarray:
        if self._buf is None or self._buf.shape[1] != dim:
            self._buf = np.empty((CAST_ROWS, dim), dtype=np.float32)
        return self._buf

    def scan(self, path: str, k_shot: int, k_mean: int, group: str = "*") -> dict[str, Any]:
        """Top-k candidates of one data file; returns the payload sent to the driver.

        ``group`` names the lists the file competes in (its corpus under quotas): floors
        are kept per group and list lengths.
        """
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        num_shots = self.queries.shape[0]
        key = (group, k_shot, k_mean)
        floors = self.floors.get(key)
        if floors is None:
            floors = self.floors[key] = Floors(num_shots, k_shot, k_mean)
        pool = Pool()
        pending: list[Pool] = []
        leaked_pos: list[np.ndarray] = []
        leaked_shot: list[np.ndarray] = []
        leaked_sim: list[np.ndarray] = []
        n_leaked = 0
        offset = 0
        t0 = time.perf_counter()
        for vec in iter_vectors(pf, path, self.chunk_rows, self.queries.shape[1],
                                self.vector_cache, self.cache_dtype):
            n = vec.shape[0]
            cs = score_chunk(self._sims_fn(vec), num_shots, n, offset, k_shot, k_mean,
                             self.leakage_threshold, self.query_block, floors.values())
            floors.update(cs.q, cs.score)
            n_leaked += len(cs.leaked)
            if len(cs.leaked) and sum(len(x) for x in leaked_pos) < self.max_leaked:
                leaked_pos.append(cs.leaked)
                leaked_shot.append(cs.leaked_shot)
                leaked_sim.append(cs.leaked_sim)
            upos, inv = np.unique(cs.pos, return_inverse=True)
            local = upos - offset
            pending.append(Pool(cs.q, inv.astype(np.int64), cs.score,
                                upos.astype(object),  # positions stand in for ids until the end
                                upos.astype(np.int64), np.zeros(len(upos), np.int32),
                                cs.max_sim[local], cs.mean_sim[local]))
            # A merge sorts every entry: merge when the waiting entries outnumber the pool's
            # (once floors exist, chunks add ever fewer).
            if sum(len(p) for p in pending) > max(len(pool), num_shots * k_shot + k_mean):
                pool = _merge_positions([pool, *pending]).reduce(k_shot, k_mean)
                pending = []
            offset += n
        pool = _merge_positions([pool, *pending]).reduce(k_shot, k_mean)
        # Resolve positions to doc ids / rows / text lengths (only for the candidates).
        pos = pool.row
        leaked = np.concatenate(leaked_pos)[: self.max_leaked] if leaked_pos else \
            np.zeros(0, np.int64)
        need = np.concatenate([pos, leaked])
        if len(need):
            ids, rows, lens = read_meta(pf, path, self.vector_cache, need)
        else:
            ids, rows, lens = np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0, np.int32)
        m = len(pos)
        pool.doc_id, pool.row, pool.text_len = ids[:m], rows[:m].astype(np.int64), \
            lens[:m].astype(np.int32)
        return {
            "num_rows": offset, "pool": pool, "n_leaked": n_leaked,
            "scan_seconds": time.perf_counter() - t0, "floors": floors.values(),
            "leaked_doc_id": ids[m:], "leaked_shot": (np.concatenate(leaked_shot)[: len(leaked)]
                                                      if leaked_shot else np.zeros(0, np.int64)),
            "leaked_sim": (np.concatenate(leaked_sim)[: len(leaked)] if leaked_sim
                           else np.zeros(0, np.float32)),
        }


def _merge_positions(pools: list[Pool]) -> Pool:
    """Concatenate pools of one shard whose documents are still shard positions (``row``)."""
    pools = [p for p in pools if p.num_docs]
    if not pools:
        return Pool()
    if len(pools) == 1:
        return pools[0]
    offsets = np.cumsum([0] + [p.num_docs for p in pools[:-1]])
    rows = np.concatenate([p.row for p in pools])
    uniq, first, inv = np.unique(rows, return_index=True, return_inverse=True)
    u = inv[np.concatenate([p.u + o for p, o in zip(pools, offsets)])]
    cat = {a: np.concatenate([getattr(p, a) for p in pools])
           for a in ("q", "score", "doc_id", "text_len", "max_sim", "mean_sim")}
    return Pool(cat["q"], u.astype(np.int64), cat["score"], cat["doc_id"][first], uniq,
                cat["text_len"][first], cat["max_sim"][first], cat["mean_sim"][first])


class SimilarityScorer:
    """Similarity actor: scans whole store data files for the searches it is given.

    It lives as long as its :class:`StoreSearcher` (so rescans and repeated searches do not
    pay the actor start-up again) and keeps one :class:`ShardScanner` for the current
    search. A retried call (a restarted actor) starts from no floors: its pool is a
    superset of what the first attempt would have sent, and the driver keeps a document
    once.
    """

    def __init__(self, chunk_rows: int, query_block: int, use_gpu: bool,
                 vector_cache: str | None = None, cache_dtype: CacheDtype = "auto") -> None:
        self.device = "cpu"
        if use_gpu:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("retrieve.num_gpus > 0 but torch sees no CUDA device")
            self.device = "cuda"
        self.chunk_rows, self.query_block = chunk_rows, query_block
        self.vector_cache, self.cache_dtype = vector_cache, cache_dtype
        self.search_id: int | None = None
        self.scanner: ShardScanner | None = None
        self.base_rss_mb = _peak_rss_mb()  # after imports, before any scan

    def scan_file(self, search_id: int, queries: np.ndarray, leakage_threshold: float | None,
                  budgets: dict[str, tuple[int, int]], path: str, corpus: str, shard: str
                  ) -> dict[str, Any]:
        """The candidate pool of one data file, with its provenance and this actor's RSS."""
        if self.scanner is None or search_id != self.search_id:
            self.scanner = ShardScanner(queries, leakage_threshold, self.chunk_rows,
                                        self.query_block, self.device,
                                        vector_cache=self.vector_cache,
                                        cache_dtype=self.cache_dtype)
            self.search_id = search_id
        group = "*" if "*" in budgets else corpus
        k_shot, k_mean = budgets.get(group, (0, 0))
        res = self.scanner.scan(path, k_shot, k_mean, group)
        res["corpus"], res["shard"] = corpus, shard
        res["pid"], res["peak_rss_mb"] = os.getpid(), _peak_rss_mb()
        res["base_rss_mb"] = self.base_rss_mb
        return res


def _peak_rss_mb() -> float:
    """This process' peak resident memory in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the search over a store (Ray) -------------------------------------------------------


@dataclass
class SearchResult:
    """Merged pools per corpus group (``"*"`` when corpora compete together)."""

    pools: dict[str, Pool]
    num_rows: int
    n_leaked: int
    leaked: list[dict[str, Any]]
    seconds: float
    actor_peak_rss_mb: dict[int, float] = field(default_factory=dict)  # by actor pid
    actor_base_rss_mb: dict[int, float] = field(default_factory=dict)  # same, before scanning
    scan_seconds: float = 0.0  # the actors' time in scans, summed over files


class StoreSearcher:
    """Similarity actors over one store, started once and reused by every search.

    Plain Ray actors (each with two files queued) rather than a Ray Data pipeline: the
    inputs are a list of files and the outputs small pools, so Ray Data's streaming buys
    nothing here, and its executor start-up (~1.5-2 s on 2 cores, measured with an empty
    actor) would cost more than scanning a million vectors. The actors start when the
    searcher is made (asynchronously) and stop on :meth:`close` (or leaving a ``with``).
    """

    def __init__(self, store: str | Path, info: StoreInfo, *, chunk_rows: int = 32_768,
                 query_block: int = 256, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 concurrency: int = 1, vector_cache: bool = False,
                 cache_dtype: CacheDtype = "auto") -> None:
        import ray

        self.store, self.info = Path(store), info
        self._searches = 0
        files = [s for s in info.shards if s.num_rows]
        actor_cls = ray.remote(SimilarityScorer).options(
            num_cpus=num_cpus, num_gpus=num_gpus or None, max_restarts=2, max_task_retries=2)
        cache = str(self.store / "_vector_cache") if vector_cache else None
        self.actors = [actor_cls.remote(chunk_rows, query_block, bool(num_gpus), cache,
                                        cache_dtype)
                       for _ in range(max(1, min(concurrency, len(files))))]

    def __enter__(self) -> StoreSearcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def search(self, queries: np.ndarray, budgets: dict[str, tuple[int, int]], *,
               leakage_threshold: float | None = None,
               corpora: Sequence[str] | None = None) -> SearchResult:
        """Stream every data file of the store through the actors and merge the pools.

        ``budgets`` maps a corpus name (or ``"*"`` for all) to ``(k_shot, k_mean)``. The
        driver merges the shards' pools as they arrive, a few at a time, so it holds at most
        one group's candidates plus about eight lists' worth of waiting entries, never the
        store.
        """
        import ray

        if not self.actors:
            raise RuntimeError("this StoreSearcher is closed")
        t0 = time.time()
        shards = [s for s in self.info.shards
                  if s.num_rows and (corpora is None or s.corpus in corpora)]
        items = [{"path": str(self.store / s.file), "corpus": s.corpus, "shard": s.shard}
                 for s in shards]
        grouped = "*" not in budgets
        pools: dict[str, Pool] = {}
        n_rows = n_leaked = 0
        leaked: list[dict[str, Any]] = []
        peaks: dict[int, float] = {}
        bases: dict[int, float] = {}
        if not items:
            return SearchResult({}, 0, 0, [], time.time() - t0)
        self._searches += 1
        search_id = self._searches
        scan_s = 0.0
        q = ray.put(np.asarray(queries, dtype=np.float32))  # F x dim, shared by all calls
        results = _map_actors(
            self.actors, items,
            lambda a, it: a.scan_file.remote(search_id, q, leakage_threshold, budgets,
                                             it["path"], it["corpus"], it["shard"]))
        # Pools wait in `pending` and are merged a few at a time: a merge sorts every entry,
        # so merging each shard's pool on arrival would cost the driver a sort per shard.
        pending: dict[str, list[Pool]] = {}
        # The highest floor any actor reported, per list: every actor's floor is a bound
        # for the whole search, so the merges drop entries below it before sorting.
        floors: dict[str, np.ndarray] = {}
        seen: set[tuple[str, str]] = set()
        for res in results:
            if (res["corpus"], res["shard"]) in seen:  # a shard's result arrives once, but
                continue                                # never count a file twice
            seen.add((res["corpus"], res["shard"]))
            key = res["corpus"] if grouped else "*"
            k_shot, k_mean = budgets[key]
            floors[key] = np.maximum(floors.get(key, res["floors"]), res["floors"])
            waiting = pending.setdefault(key, [])
            waiting.append(res["pool"])
            if sum(len(p) for p in waiting) > 8 * (len(queries) * k_shot + k_mean):
                # each shard's result is taken once (above), so no document comes twice
                pools[key] = Pool.concat([pools.get(key, Pool()), *waiting],
                                         distinct_docs=True).reduce(k_shot, k_mean,
                                                                    floors[key])
                waiting.clear()
            n_rows += res["num_rows"]
            n_leaked += res["n_leaked"]
            scan_s += res["scan_seconds"]
            peaks[res["pid"]] = max(peaks.get(res["pid"], 0.0), res["peak_rss_mb"])
            bases[res["pid"]] = res["base_rss_mb"]
            for d, s, v in zip(res["leaked_doc_id"], res["leaked_shot"], res["leaked_sim"]):
                leaked.append({"doc_id": str(d), "shot": int(s), "similarity": float(v)})
        for key, waiting in pending.items():
            if waiting:
                k_shot, k_mean = budgets[key]
                pools[key] = Pool.concat([pools.get(key, Pool()), *waiting],
                                         distinct_docs=True).reduce(k_shot, k_mean,
                                                                    floors[key])
        leaked.sort(key=lambda r: (r["doc_id"], r["shot"]))  # shards finish in any order
        return SearchResult(pools, n_rows, n_leaked, leaked, time.time() - t0, peaks, bases,
                            scan_s)


def _map_actors(actors: Sequence[Any], items: Sequence[Any], call: Any, depth: int = 2
                ) -> Iterator[Any]:
    """``call(actor, item)`` for every item, results as they finish (any order).

    Like ``ray.util.ActorPool.map_unordered``, but each actor has up to ``depth`` calls
    queued, so it starts its next file without waiting for the driver to collect the last.
    """
    import ray

    todo = list(reversed(items))
    inflight: dict[Any, Any] = {}
    for a in actors:
        for _ in range(depth):
            if todo:
                inflight[call(a, todo.pop())] = a
    while inflight:
        done, _ = ray.wait(list(inflight), num_returns=1)
        actor = inflight.pop(done[0])
        if todo:
            inflight[call(actor, todo.pop())] = actor
        yield ray.get(done[0])


def search_store(store: str | Path, info: StoreInfo, queries: np.ndarray,
                 budgets: dict[str, tuple[int, int]], *,
                 leakage_threshold: float | None = None, chunk_rows: int = 32_768,
                 query_block: int = 256, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 concurrency: int = 1, corpora: Sequence[str] | None = None,
                 vector_cache: bool = False, cache_dtype: CacheDtype = "auto"
                 ) -> SearchResult:
    """One search with a :class:`StoreSearcher` of its own (actors started and stopped)."""
    with StoreSearcher(store, info, chunk_rows=chunk_rows, query_block=query_block,
                       num_cpus=num_cpus, num_gpus=num_gpus, concurrency=concurrency,
                       vector_cache=vector_cache, cache_dtype=cache_dtype) as searcher:
        return searcher.search(queries, budgets, leakage_threshold=leakage_threshold,
                               corpora=corpora)


# --- optional FAISS index ----------------------------------------------------------------


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise RetrieveError("retrieve.index needs FAISS: pip install faiss-cpu "
                            "(or faiss-gpu)") from exc
    return faiss


def index_path(store: str | Path, cfg: IndexConfig) -> Path:
    """Where the index of ``store`` with these settings lives (changes with store.json)."""
    import hashlib

    from craft_ray.store import STORE_INFO

    tag = hashlib.sha1((Path(store) / STORE_INFO).read_bytes()
                       + cfg.model_dump_json(exclude={"nprobe", "ef_search",
                                                       "leak_margin"}).encode()).hexdigest()
    return Path(store) / "_faiss" / f"{cfg.kind}-{tag[:16]}.index"


def build_faiss_index(store: str | Path, info: StoreInfo, cfg: IndexConfig) -> Path:
    """Build (or reuse) a FAISS inner-product index over the store, shard by shard.

    Index ids are store order (shards as listed in store.json, rows in file order); the doc
    ids are written beside it (``.ids.parquet``). Both go through temporary files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    faiss = _faiss()
    out = index_path(store, cfg)
    ids_out = out.with_suffix(".ids.parquet")
    if out.is_file() and ids_out.is_file():
        return out
    dim = info.dim

    def shard_vectors() -> Iterator[tuple[np.ndarray, pa.Table]]:
        for sh in info.shards:
            if not sh.num_rows:
                continue
            pf = pq.ParquetFile(Path(store) / sh.file)
            meta = pf.read(columns=["doc_id", "text_len"])
            vec = np.concatenate([v.astype(np.float32) for v in
                                  iter_vectors(pf, str(Path(store) / sh.file), 65_536, dim,
                                               None)])
            yield vec, meta

    if cfg.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
    else:
        nlist = min(cfg.nlist, max(1, info.num_rows // 39))  # FAISS wants >= 39 per list
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample, got = [], 0
        for vec, _ in shard_vectors():
            sample.append(vec[: cfg.train_size - got])
            got += len(sample[-1])
            if got >= cfg.train_size:
                break
        index.train(np.concatenate(sample))
        index.make_direct_map()  # lets reconstruct() return candidates' vectors
    tables = []
    for vec, meta in shard_vectors():
        index.add(vec)
        tables.append(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(out)
    faiss.write_index(index, str(tmp))
    tmp_ids = tmp_path_for(ids_out)
    pq.write_table(pa.concat_tables(tables), tmp_ids)
    os.replace(tmp_ids, ids_out)
    os.replace(tmp, out)  # the index last: its presence means both files are complete
    logger.info("retrieve: built FAISS %s index of %d vectors at %s", cfg.kind, index.ntotal,
                out)
    return out


def search_faiss(store: str | Path, info: StoreInfo, cfg: IndexConfig, queries: np.ndarray,
                 k_shot: int, k_mean: int, leakage_threshold: float | None) -> SearchResult:
    """Per-few-shot and mean lists from a FAISS index (built on first use).

    The mean list searches with the mean of the few-shot vectors: q_mean . x equals the mean
    of the similarities, so its ranking is the mean-similarity ranking. Each candidate's
    max/mean similarity over all few-shots is computed exactly from its reconstructed vector,
    and the leakage guard applies to them as in the streaming search.
    """
    import pyarrow.parquet as pq

    faiss = _faiss()
    t0 = time.time()
    path = build_faiss_index(store, info, cfg)
    index = faiss.read_index(str(path))
    if cfg.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = cfg.nprobe
        index.make_direct_map()
    elif cfg.kind == "hnsw":
        index.hnsw.efSearch = cfg.ef_search
    meta = pq.read_table(path.with_suffix(".ids.parquet"))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = index.ntotal
    hits_q, hits_i, hits_s = [], [], []
    if k_shot:
        s, i = index.search(q, min(n, k_shot + cfg.leak_margin))
        hits_q.append(np.repeat(np.arange(len(q)), s.shape[1]))
        hits_i.append(i.reshape(-1))
        hits_s.append(s.reshape(-1))
    if k_mean:
        s, i = index.search(q.mean(axis=0, keepdims=True), min(n, k_mean + cfg.leak_margin))
        hits_q.append(np.full(s.shape[1], MEAN))
        hits_i.append(i[0])
        hits_s.append(s[0])
    qq, ii, ss = (np.concatenate(x) for x in (hits_q, hits_i, hits_s))
    ok = ii >= 0  # approximate indexes pad missing hits with -1
    qq, ii, ss = qq[ok], ii[ok], ss[ok]
    uniq, inv = np.unique(ii, return_inverse=True)
    vec = np.stack([index.reconstruct(int(j)) for j in uniq]) if len(uniq) else \
        np.zeros((0, info.dim), np.float32)
    sims = vec @ q.T  # [docs, shots]
    max_sim = sims.max(axis=1) if len(uniq) else np.zeros(0, np.float32)
    mean_sim = sims.mean(axis=1) if len(uniq) else np.zeros(0, np.float32)
    leaked: list[dict[str, Any]] = []
    keep = np.ones(len(qq), dtype=bool)
    n_leaked = 0
    doc_ids = np.array(meta.column("doc_id").take(uniq).to_pylist(), dtype=object)
    if leakage_threshold is not None and len(uniq):
        bad = max_sim >= leakage_threshold
        n_leaked = int(bad.sum())
        keep = ~bad[inv]
        leaked = [{"doc_id": str(doc_ids[j]), "shot": int(sims[j].argmax()),
                   "similarity": float(max_sim[j])} for j in np.flatnonzero(bad)]
    from craft_ray.corpus import parse_doc_id

    rows = np.array([parse_doc_id(str(d))[2] for d in doc_ids], dtype=np.int64)
    pool = Pool(qq[keep].astype(np.int32), inv[keep].astype(np.int64),
                ss[keep].astype(np.float32), doc_ids, rows,
                meta.column("text_len").take(uniq).to_numpy().astype(np.int32),
                max_sim.astype(np.float32), mean_sim.astype(np.float32))
    pool = pool.reduce(k_shot, k_mean)
    return SearchResult({"*": pool}, n, n_leaked, leaked, time.time() - t0)


# --- selection ----------------------------------------------------------------------------


@dataclass
class Selected:
    """One selected document with its provenance."""

    u: int                          # index into the pool's doc arrays
    selected_by: str                # "per_shot" | "mean" | "both"
    shots: list[int]                # few-shots whose own list holds it
    shot_ranks: list[int]           # 1-based rank in each of those lists
    mean_rank: int | None           # 1-based rank in the mean list


def select(mode: Mode, k: int, per_shot: list[np.ndarray], mean: np.ndarray) -> list[Selected]:
    """Pick ``k`` documents from ranked lists, deduplicated by document.

    per_shot: round-robin over the few-shots by rank (rank 1 of every few-shot, then rank 2,
    ...). mean: the mean list in order. mixed: alternately the next new document of the
    per-shot stream and of the mean stream, so each side supplies half; when one side runs
    out the other fills up. Provenance lists every list that holds the document (within the
    oversampled lists), so a document found by both sides is ``both``.
    """
    shot_hits: dict[int, list[tuple[int, int]]] = {}
    depth = max((len(p) for p in per_shot), default=0)
    stream_shot: list[int] = []
    for r in range(depth):
        for i, lst in enumerate(per_shot):
            if r < len(lst):
                u = int(lst[r])
                shot_hits.setdefault(u, []).append((i, r + 1))
                stream_shot.append(u)
    mean_rank = {int(u): r + 1 for r, u in enumerate(mean)}
    stream_mean = [int(u) for u in mean]

    chosen: dict[int, None] = {}
    if mode == "per_shot":
        streams = [stream_shot]
    elif mode == "mean":
        streams = [stream_mean]
    else:
        streams = [stream_shot, stream_mean]
    pos = [0] * len(streams)
    turn = 0
    while len(chosen) < k and any(p < len(s) for p, s in zip(pos, streams)):
        s = streams[turn]
        while pos[turn] < len(s) and s[pos[turn]] in chosen:
            pos[turn] += 1
        if pos[turn] < len(s):
            chosen[s[pos[turn]]] = None
            pos[turn] += 1
        turn = (turn + 1) % len(streams)
    out = []
    for u in chosen:
        hits = sorted(shot_hits.get(u, []))
        in_mean = u in mean_rank
        by = "both" if hits and in_mean else ("per_shot" if hits else "mean")
        out.append(Selected(u, by, [h[0] for h in hits], [h[1] for h in hits],
                            mean_rank.get(u)))
    return out


# --- fetching documents back --------------------------------------------------------------


def fetch_shard_docs(batch: dict[str, np.ndarray], corpora: dict[str, dict[str, Any]]
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: stream each shard's source file and yield the wanted rows' texts.

    A wanted row that the reader no longer returns as a document (source file changed since
    embedding) comes back with ``reject_reason`` set instead of text.
    """
    from craft_ray.corpus import CorpusConfig, Shard, make_doc_id, read_shard

    for corpus, shard, path, rows_json in zip(batch["corpus"], batch["shard"], batch["path"],
                                              batch["rows"]):
        wanted = {int(r): int(n) for r, n in json.loads(str(rows_json))}
        cfg = CorpusConfig.model_validate(corpora[str(corpus)])
        found: dict[int, dict[str, Any]] = {}
        if os.path.isfile(str(path)):
            for rec in read_shard(Shard(str(corpus), str(path), str(shard)), cfg):
                r = rec["row"]
                if r in wanted and rec["reject_reason"] is None:
                    found[r] = rec
                    if len(found) == len(wanted):
                        break
        out: dict[str, list[Any]] = {"doc_id": [], "text": [], "metadata": [],
                                     "reject_reason": []}
        for r, n in sorted(wanted.items()):
            rec = found.get(r)
            out["doc_id"].append(make_doc_id(str(corpus), str(shard), r))
            if rec is None:
                why = "source_missing" if not os.path.isfile(str(path)) else "not_in_source"
                out["text"].append("")
                out["metadata"].append("")
                out["reject_reason"].append(why)
            elif rec["text_len"] != n:
                out["text"].append("")
                out["metadata"].append(rec["metadata"])
                out["reject_reason"].append("source_changed")
            else:
                out["text"].append(rec["text"])
                out["metadata"].append(rec["metadata"])
                out["reject_reason"].append("")  # "" = fetched (all-None columns turn to NaN)
        yield {k: np.array(v, dtype=object) for k, v in out.items()}


def fetch_docs(info: StoreInfo, docs: list[tuple[str, str, int, int]], num_cpus: float
               ) -> dict[str, dict[str, Any]]:
    """Texts of ``docs`` (corpus, shard, row, text_len), read back from the corpora by id."""
    import ray.data

    by_shard: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for corpus, shard, row, n in docs:
        by_shard.setdefault((corpus, shard), []).append((row, n))
    items = []
    for (corpus, shard), rows in sorted(by_shard.items()):
        path = info.shard_paths.get(f"{corpus}/{shard}")
        if path is None:
            raise StoreError(f"store.json has no source path for shard {corpus}/{shard}; "
                             "re-run `craft-ray embed` to rebuild the store metadata")
        items.append({"corpus": corpus, "shard": shard, "path": path,
                      "rows": json.dumps(sorted(rows))})
    if not items:
        return {}
    corpora = {c["name"]: c for c in info.corpora}
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fetch_shard_docs, batch_size=1, num_cpus=num_cpus, fn_kwargs={"corpora": corpora})
    out: dict[str, dict[str, Any]] = {}
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        for d, t, m, r in zip(batch["doc_id"], batch["text"], batch["metadata"],
                              batch["reject_reason"]):
            out[str(d)] = {"text": str(t), "metadata": str(m), "reject_reason": str(r)}
    return out


# --- checks before any work ---------------------------------------------------------------


def check_store(info: StoreInfo, store: str | Path, model: str | None, dim: int | None) -> str:
    """The model to embed few-shots with; a mismatch with the store is a :class:`RetrieveError`."""
    import pyarrow.parquet as pq

    from craft_ray.embed import resolve_model

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
        p = Path(store) / sh.file
        if not p.is_file():
            raise RetrieveError(f"store data file {p} is missing; re-run `craft-ray embed`")
        width = pq.read_schema(p).field("embedding").type.list_size
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
    from craft_ray.embed import encode_texts, load_sentence_transformer

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

    store: Path
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
    store = Path(cfg.store) if cfg.store else Path(stage_cfg.run_dir) / "embed" / "store"
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


def run_retrieve(stage_cfg: RetrieveStageConfig, *, force: bool = False,
                 base_dir: str | Path | None = None,
                 prepared: Prepared | None = None) -> dict[str, Any]:
    """Run the retrieval stage (Ray must be initialised). Returns the stage's stats.

    Every check runs (in :func:`prepare_retrieve`) before any similarity is computed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = stage_cfg.retrieve
    stage = StageDir(stage_cfg.run_dir, "retrieve")
    if not force and stage.is_complete(cfg):
        logger.info("retrieve: already complete in %s (same config); skipping", stage.path)
        return json.loads((stage.path / "stats.json").read_text())
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

    from craft_ray.corpus import parse_doc_id

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

    schema = _samples_schema()
    table = pa.Table.from_pylist(good, schema=schema)
    out = stage.path / "corpus_samples.parquet"
    tmp = tmp_path_for(out)
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    if cfg.write_jsonl:
        tmpj = tmp_path_for(stage.path / "corpus_samples.jsonl")
        with open(tmpj, "w", encoding="utf-8") as fh:
            for r in good:
                fh.write(json.dumps({k: r[k] for k in schema.names}, ensure_ascii=False) + "\n")
        os.replace(tmpj, stage.path / "corpus_samples.jsonl")
    leak_rows = [{"doc_id": d["doc_id"], "fewshot_id": shots[d["shot"]].id,
                  "similarity": d["similarity"]} for d in res.leaked]
    _write_small_parquet(stage.path / "leakage.parquet", leak_rows,
                         [("doc_id", pa.string()), ("fewshot_id", pa.string()),
                          ("similarity", pa.float64())])
    _write_small_parquet(stage.path / "rejects.parquet", rejects,
                         [("doc_id", pa.string()), ("reject_reason", pa.string())])
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


def _write_small_parquet(path: Path, rows: list[dict[str, Any]], fields: list[Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = tmp_path_for(path)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), tmp)
    os.replace(tmp, path)


__all__ = [
    "Budget", "Floors", "IndexConfig", "Pool", "Prepared", "RetrieveConfig", "RetrieveError",
    "RetrieveStageConfig", "SearchResult", "Selected", "ShardScanner", "SimilarityScorer",
    "StoreSearcher", "build_faiss_index", "fetch_docs", "mode_budget", "prepare_retrieve",
    "ranked_lists", "run_retrieve", "search_faiss", "search_store", "select", "split_quota",
]
