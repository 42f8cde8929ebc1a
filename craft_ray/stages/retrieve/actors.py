"""Ray actors that scan the embedding store in parallel, and the searcher that drives them."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.runtime import storage
from craft_ray.stages.retrieve.ranking import Pool
from craft_ray.stages.retrieve.scan import CacheDtype, SimilarityScorer
from craft_ray.store.vectors import StoreInfo

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


def vector_cache_dir(store: str) -> Path:
    """STORE/_vector_cache for a local store; for an object-store one, a folder of each
    node's own cache (the cache is memory-mapped, so it must be local)."""
    if not storage.is_uri(store):
        return Path(store) / "_vector_cache"
    import hashlib

    return storage.cache_root() / "vector_cache" / hashlib.sha1(store.encode()).hexdigest()[:16]


class StoreSearcher:
    """Similarity actors over one store, started once and reused by every search.

    ``key`` is the config section of the actors' settings, named when they cannot fit the
    cluster (:func:`craft_ray.resources.actor_resources`).

    Plain Ray actors (each with two files queued) rather than a Ray Data pipeline: the
    inputs are a list of files and the outputs small pools, so Ray Data's streaming buys
    nothing here, and its executor start-up (~1.5-2 s on 2 cores, measured with an empty
    actor) would cost more than scanning a million vectors. The actors start when the
    searcher is made (asynchronously) and stop on :meth:`close` (or leaving a ``with``).
    """

    def __init__(self, store: str | Path, info: StoreInfo, *, chunk_rows: int = 32_768,
                 query_block: int = 256, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 concurrency: int = 1, vector_cache: bool = False,
                 cache_dtype: CacheDtype = "auto", key: str = "retrieve") -> None:
        import ray

        from craft_ray.resources import actor_resources

        self.store, self.info = str(store), info
        self._searches = 0
        files = [s for s in info.shards if s.num_rows]
        # An actor too big for every node would wait forever: fail first, naming ``key``.
        # Nothing else of the search runs beside the actors (no task reserve).
        actor_resources(num_cpus, max(1, min(concurrency, len(files))), num_gpus, key=key,
                        task_cpus=0.0)
        actor_cls = ray.remote(SimilarityScorer).options(
            num_cpus=num_cpus, num_gpus=num_gpus or None, max_restarts=2, max_task_retries=2)
        cache = str(vector_cache_dir(self.store)) if vector_cache else None
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
        items = [{"path": storage.join(self.store, s.file), "corpus": s.corpus, "shard": s.shard}
                 for s in shards]
        if not items:
            return SearchResult({}, 0, 0, [], time.time() - t0)
        self._searches += 1
        search_id = self._searches
        q = ray.put(np.asarray(queries, dtype=np.float32))  # F x dim, shared by all calls
        results = _map_actors(
            self.actors, items,
            lambda a, it: a.scan_file.remote(search_id, q, leakage_threshold, budgets,
                                             it["path"], it["corpus"], it["shard"]))
        out = _merge_results(results, budgets, len(queries))
        out.seconds = time.time() - t0
        return out


def _merge_results(results: Iterator[dict[str, Any]], budgets: dict[str, tuple[int, int]],
                   num_queries: int) -> SearchResult:
    """The files' payloads merged as they arrive into one pool per group, with the totals
    (rows, leaked rows, scan seconds, the actors' memory); ``seconds`` is the caller's."""
    out = SearchResult({}, 0, 0, [], 0.0)
    grouped = "*" not in budgets
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
        if sum(len(p) for p in waiting) > 8 * (num_queries * k_shot + k_mean):
            _merge_waiting(out.pools, key, waiting, budgets[key], floors[key])
        _add_totals(out, res)
    for key, waiting in pending.items():
        if waiting:
            _merge_waiting(out.pools, key, waiting, budgets[key], floors[key])
    out.leaked.sort(key=lambda r: (r["doc_id"], r["shot"]))  # shards finish in any order
    return out


def _merge_waiting(pools: dict[str, Pool], key: str, waiting: list[Pool],
                   budget: tuple[int, int], floor: np.ndarray) -> None:
    """Merge the waiting pools of group ``key`` into ``pools[key]`` and empty ``waiting``."""
    k_shot, k_mean = budget
    # each shard's result is taken once, so no document comes twice
    pools[key] = Pool.concat([pools.get(key, Pool()), *waiting],
                             distinct_docs=True).reduce(k_shot, k_mean, floor)
    waiting.clear()


def _add_totals(out: SearchResult, res: dict[str, Any]) -> None:
    """Add one file's rows, leaked rows, scan time and its actor's memory to ``out``."""
    out.num_rows += res["num_rows"]
    out.n_leaked += res["n_leaked"]
    out.scan_seconds += res["scan_seconds"]
    pid = res["pid"]
    out.actor_peak_rss_mb[pid] = max(out.actor_peak_rss_mb.get(pid, 0.0), res["peak_rss_mb"])
    out.actor_base_rss_mb[pid] = res["base_rss_mb"]
    for d, s, v in zip(res["leaked_doc_id"], res["leaked_shot"], res["leaked_sim"]):
        out.leaked.append({"doc_id": str(d), "shot": int(s), "similarity": float(v)})


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
