"""Optional FAISS index over the store: build and search."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.runtime import atomic_path, storage
from craft_ray.stages.retrieve.actors import SearchResult
from craft_ray.stages.retrieve.config import MEAN, IndexConfig, RetrieveError
from craft_ray.stages.retrieve.ranking import Pool
from craft_ray.stages.retrieve.scan import iter_vectors
from craft_ray.store.vectors import StoreInfo

logger = logging.getLogger(__name__)


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

    from craft_ray.store.vectors import STORE_INFO

    tag = hashlib.sha1(storage.read_bytes(storage.join(store, STORE_INFO))
                       + cfg.model_dump_json(exclude={"nprobe", "ef_search",
                                                       "leak_margin"}).encode()).hexdigest()
    # FAISS reads and writes local files: STORE/_faiss, or this machine's cache for a store
    # on an object store (the index is built and searched by the driver)
    folder = (storage.cache_root() / "faiss" / hashlib.sha1(str(store).encode()).hexdigest()[:16]
              if storage.is_uri(store) else Path(store) / "_faiss")
    return folder / f"{cfg.kind}-{tag[:16]}.index"


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
            pf = storage.parquet_file(storage.join(store, sh.file))
            meta = pf.read(columns=["doc_id", "text_len"])
            vec = np.concatenate([v.astype(np.float32) for v in
                                  iter_vectors(pf, storage.join(store, sh.file), 65_536, dim,
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
    # the ids block ends first: the index is renamed last, its presence means both are complete
    with atomic_path(out) as tmp:
        faiss.write_index(index, str(tmp))
        with atomic_path(ids_out) as tmp_ids:
            pq.write_table(pa.concat_tables(tables), tmp_ids)
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

    from craft_ray.store.corpus import parse_doc_id

    t0 = time.time()
    path = build_faiss_index(store, info, cfg)
    index = _open_index(path, cfg)
    meta = pq.read_table(path.with_suffix(".ids.parquet"))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    qq, ii, ss = _index_hits(index, q, k_shot, k_mean, cfg.leak_margin)
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
    rows = np.array([parse_doc_id(str(d))[2] for d in doc_ids], dtype=np.int64)
    pool = Pool(qq[keep].astype(np.int32), inv[keep].astype(np.int64),
                ss[keep].astype(np.float32), doc_ids, rows,
                meta.column("text_len").take(uniq).to_numpy().astype(np.int32),
                max_sim.astype(np.float32), mean_sim.astype(np.float32))
    pool = pool.reduce(k_shot, k_mean)
    return SearchResult({"*": pool}, index.ntotal, n_leaked, leaked, time.time() - t0)


def _open_index(path: Path, cfg: IndexConfig) -> Any:
    """The index at ``path`` with its search settings (``nprobe``, ``ef_search``)."""
    faiss = _faiss()
    index = faiss.read_index(str(path))
    if cfg.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = cfg.nprobe
        index.make_direct_map()
    elif cfg.kind == "hnsw":
        index.hnsw.efSearch = cfg.ef_search
    return index


def _index_hits(index: Any, q: np.ndarray, k_shot: int, k_mean: int, leak_margin: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(list, index position, score) of the hits of each few-shot's list and of the mean
    list, ``leak_margin`` more than asked so the leakage guard can drop some."""
    n = index.ntotal
    hits_q, hits_i, hits_s = [], [], []
    if k_shot:
        s, i = index.search(q, min(n, k_shot + leak_margin))
        hits_q.append(np.repeat(np.arange(len(q)), s.shape[1]))
        hits_i.append(i.reshape(-1))
        hits_s.append(s.reshape(-1))
    if k_mean:
        s, i = index.search(q.mean(axis=0, keepdims=True), min(n, k_mean + leak_margin))
        hits_q.append(np.full(s.shape[1], MEAN))
        hits_i.append(i[0])
        hits_s.append(s[0])
    qq, ii, ss = (np.concatenate(x) for x in (hits_q, hits_i, hits_s))
    ok = ii >= 0  # approximate indexes pad missing hits with -1
    return qq[ok], ii[ok], ss[ok]
