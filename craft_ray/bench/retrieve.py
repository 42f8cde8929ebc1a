"""``craft-ray bench retrieve``: the retrieval stage's exact top-k against FAISS IndexFlatIP.

Both search the same float16 unit vectors (FAISS gets them as float32, in memory, as it
needs). Three figures for the stage, each against its FAISS counterpart:

- ``stage_s`` / ``ratio``: the search with the similarity actors up and the vectors cached
  (a :class:`StoreSearcher` searched again), against ``faiss_s``, FAISS's search with its
  index built and in memory; after a warm-up of each, ``repeats`` rounds interleaved (stage,
  FAISS, stage, FAISS, ...), ``ratio`` the median of the per-round ratios
  (:mod:`craft_ray.bench.measure`).
- ``stage_fresh_s`` / ``ratio_fresh``: what a fresh process pays on a store with its vector
  cache: starting the actors plus one search, against FAISS loading the same cached float32
  vectors (and the doc ids), adding them to the index and searching (once each).
- ``stage_cold_s``: the first search ever (actors started, Parquet decoded, cache written).

The stage's memory is measured before FAISS loads the matrix, so the driver's peak is the
stage's."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from craft_ray.bench.measure import (
    conditions,
    interleave,
    load_average,
    paired_ratio,
    summary,
    thread_report,
)
from craft_ray.store.vectors import (
    ShardInfo,
    StoreInfo,
    embedding_array,
    read_info,
    write_info,
    write_store_table,
)

logger = logging.getLogger(__name__)


def _has_store_layout(data_file: Path) -> bool:
    """Whether a data file was written as :func:`write_store_table` writes them today (a store
    left by an older version is rebuilt, so the benchmark measures the current layout)."""
    rg = pq.ParquetFile(data_file).metadata.row_group(0)
    cols = [rg.column(i) for i in range(rg.num_columns)
            if rg.column(i).path_in_schema.startswith("embedding")]
    return bool(cols) and all(c.compression == "UNCOMPRESSED"
                              and "RLE_DICTIONARY" not in c.encodings for c in cols)


def build_random_store(path: Path, rows: int, dim: int, shards: int, seed: int = 0
                       ) -> StoreInfo:
    """A store of ``rows`` random float16 unit vectors in ``shards`` data files (reused when
    one with the same shape exists)."""
    try:
        info = read_info(path)
        if info.num_rows == rows and info.dim == dim and len(info.shards) == shards \
                and _has_store_layout(path / info.shards[0].file):
            return info
    except Exception:  # noqa: BLE001 - no usable store yet: build it
        pass
    rng = np.random.default_rng(seed)
    per = -(-rows // shards)
    infos = []
    for s in range(shards):
        n = min(per, rows - s * per)
        v = rng.standard_normal((n, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        rel = f"data/bench/s{s:04d}.parquet"
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        start = s * per
        write_store_table(pa.table({
            "doc_id": pa.array([f"bench/s{s:04d}#{r}" for r in range(n)], pa.string()),
            "row": pa.array(np.arange(n, dtype=np.int64)),
            "text_len": pa.array(np.zeros(n, np.int32)),
            "embedding": embedding_array(v.astype(np.float16)),
        }), path / rel)
        infos.append(ShardInfo(corpus="bench", shard=f"s{s:04d}", file=rel, num_rows=n))
        del v
        logger.info("bench: wrote shard %d/%d (rows %d..%d)", s + 1, shards, start, start + n)
    info = StoreInfo(model="random", dim=dim, shards=infos)
    write_info(path, info)
    return info


def _build_store(store: Path, rows: int, dim: int, shards: int) -> tuple[StoreInfo, float]:
    """The random store, built in a child process (so this process' peak RSS stays the
    stage's); its info and the seconds it took."""
    import multiprocessing as mp

    t = time.time()
    proc = mp.get_context("spawn").Process(target=build_random_store,
                                           args=(store, rows, dim, shards))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"building the random store in {store} failed")
    return read_info(store), time.time() - t


def _faiss_index(store: Path, info: StoreInfo, dim: int, blas_threshold: int
                 ) -> tuple[Any, list[str], float, float]:
    """FAISS ``IndexFlatIP`` over the whole matrix in memory as float32 (doc ids in store
    order), read from the same raw float32 copies the stage's warm searches map (decoding the
    Parquet files would cost FAISS far more than its search); index, ids, load and add
    seconds."""
    import faiss

    from craft_ray.stages.retrieve import cache_file

    t = time.time()
    ids: list[str] = []
    xb = np.empty((info.num_rows, dim), dtype=np.float32)
    off = 0
    for sh in info.shards:
        path = store / sh.file
        vec = np.load(cache_file(str(store / "_vector_cache"), str(path), "float32"))
        xb[off:off + len(vec)] = vec
        off += len(vec)
        ids.extend(pq.read_table(path, columns=["doc_id"]).column("doc_id").to_pylist())
    load_s = time.time() - t
    faiss.cvar.distance_compute_blas_threshold = blas_threshold
    index = faiss.IndexFlatIP(dim)
    t = time.time()
    index.add(xb)
    return index, ids, load_s, time.time() - t


class _StageRuns:
    """The stage's side: searches over one store with a :class:`StoreSearcher`."""

    def __init__(self, store: Path, info: StoreInfo, q: np.ndarray, k: int, chunk_rows: int,
                 concurrency: int) -> None:
        self.store, self.info, self.q, self.k = store, info, q, k
        self.chunk_rows, self.concurrency = chunk_rows, concurrency

    def start(self) -> tuple[float, Any]:
        """New actors, ready: seconds, searcher."""
        import ray

        from craft_ray.stages.retrieve import StoreSearcher

        t = time.time()
        s = StoreSearcher(self.store, self.info, chunk_rows=self.chunk_rows, num_cpus=1,
                          concurrency=self.concurrency, vector_cache=True)
        ray.get([a.__ray_ready__.remote() for a in s.actors])
        return time.time() - t, s

    def search(self, searcher: Any) -> tuple[float, list[list[str]], Any]:
        """Timed: the search and the ranked lists (doc indices), as FAISS returns row indices;
        turning either side's indices into id strings is left out of both timings."""
        from craft_ray.stages.retrieve import ranked_lists

        t = time.time()
        res = searcher.search(self.q, {"*": (self.k, 0)})
        pool = res.pools["*"]
        per, _ = ranked_lists(pool, len(self.q), self.k, 0)
        took = time.time() - t
        return took, [[str(pool.doc_id[u]) for u in lst] for lst in per], res


def _memory(res: Any, driver_base: float) -> dict[str, Any]:
    """Peak RSS of the driver and the actors, and the search's working set: each process'
    peak above its RSS before it searched (interpreter, numpy, pyarrow and Ray's worker are a
    fixed cost, whatever the store size)."""
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    actor_peak = max(res.actor_peak_rss_mb.values(), default=0.0)
    actor_ws = [res.actor_peak_rss_mb[p] - res.actor_base_rss_mb.get(p, 0.0)
                for p in res.actor_peak_rss_mb]
    return {
        "peak_rss_mb": round(driver_peak + sum(res.actor_peak_rss_mb.values()), 1),
        "stage_working_set_mb": round((driver_peak - driver_base) + sum(actor_ws), 1),
        "driver_working_set_mb": round(driver_peak - driver_base, 1),
        "actor_working_set_mb": round(max(actor_ws, default=0.0), 1),
        "driver_peak_rss_mb": round(driver_peak, 1), "actor_peak_rss_mb": round(actor_peak, 1),
        "actors": len(res.actor_peak_rss_mb),
    }


def _interleaved(stage: _StageRuns, searcher: Any, index: Any, ids: list[str], repeats: int
                 ) -> tuple[dict[str, list[float]], float]:
    """The stage's search and FAISS's, interleaved after a warm-up of each: their seconds and
    the stage's recall@k against FAISS (on the last round)."""
    last: dict[str, Any] = {}

    def stage_side() -> float:
        took, last["stage"], _ = stage.search(searcher)
        return took

    def faiss_side() -> float:
        t = time.perf_counter()
        _, last["faiss"] = index.search(stage.q, stage.k)
        return time.perf_counter() - t

    times = interleave({"stage": stage_side, "faiss": faiss_side}, repeats=repeats)
    faiss_ids = [[ids[j] for j in row] for row in last["faiss"]]
    recall = float(np.mean([len(set(a) & set(b)) / stage.k
                            for a, b in zip(last["stage"], faiss_ids)]))
    return times, recall


def run_bench_retrieve(workdir: Path, rows: int = 1_000_000, dim: int = 384,
                       num_queries: int = 32, k: int = 1000, shards: int = 16,
                       concurrency: int = 2, chunk_rows: int = 32_768,
                       blas_threshold: int = 20, repeats: int = 3) -> dict[str, Any]:
    """Time the stage and FAISS on the same vectors; recall of the stage against FAISS."""
    import faiss
    import ray

    load_before = load_average()
    store = workdir / "store"
    info, build_s = _build_store(store, rows, dim, shards)
    rng = np.random.default_rng(123)
    q = rng.standard_normal((num_queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=concurrency, include_dashboard=False,
                 log_to_driver=False)
    import shutil

    shutil.rmtree(store / "_vector_cache", ignore_errors=True)
    driver_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Ray up, no search
    stage = _StageRuns(store, info, q, k, chunk_rows, concurrency)
    # 1) first search ever: new actors, Parquet decoded, the vector cache written.
    startup_cold_s, searcher = stage.start()
    stage_cold_s, _, _ = stage.search(searcher)
    searcher.close()
    # 2) a fresh `craft-ray retrieve` on a store with its cache: new actors, one search.
    startup_s, searcher = stage.start()
    stage_first_s, _, _ = stage.search(searcher)
    # 3) the search itself, actors up and vectors cached (as FAISS's index is built and in
    # memory); the memory figures before FAISS loads its matrix.
    stage.search(searcher)
    memory = _memory(stage.search(searcher)[2], driver_base)
    index, ids, load_s, add_s = _faiss_index(store, info, dim, blas_threshold)
    times, recall = _interleaved(stage, searcher, index, ids, repeats)
    searcher.close()
    index.reset()  # frees the matrix
    ratio = paired_ratio(times["stage"], times["faiss"])
    fresh_s = startup_s + stage_first_s
    faiss_fresh_s = load_s + add_s + summary(times["faiss"])["median"]
    return {
        "stage_s": summary(times["stage"]), "faiss_s": summary(times["faiss"]),
        "ratio": ratio["median"], "ratio_range": [ratio["min"], ratio["max"]],
        "ratio_runs": ratio["runs"], "repeats": repeats,
        "stage_fresh_s": round(fresh_s, 3), "faiss_fresh_s": round(faiss_fresh_s, 3),
        "ratio_fresh": round(fresh_s / faiss_fresh_s, 3) if faiss_fresh_s > 0 else None,
        "stage_cold_s": round(startup_cold_s + stage_cold_s, 3),
        "actor_startup_s": round(startup_s, 3), "stage_first_search_s": round(stage_first_s, 3),
        "recall": round(recall, 6), **memory,
        "store_mb": round(info.num_rows * dim * 2 / 2**20, 1),
        "faiss_add_s": round(add_s, 3), "faiss_load_s": round(load_s, 3),
        "build_store_s": round(build_s, 3), "rows": info.num_rows, "dim": dim,
        "queries": num_queries, "k": k, "shards": len(info.shards),
        "faiss_threads": faiss.omp_get_max_threads(),
        "driver_threads": thread_report(),
        **conditions(load_before),
    }
