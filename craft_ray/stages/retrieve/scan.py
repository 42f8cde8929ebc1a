"""Scanning store shards: similarity of every vector to the few-shots, chunk by chunk (numpy)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from craft_ray.runtime import atomic_path, storage
from craft_ray.stages.retrieve.config import MEAN
from craft_ray.stages.retrieve.ranking import Floors, Pool, block_entries
from craft_ray.store.vectors import StoreError

# Rows converted from float16 at a time on CPU: 4,096 x 384 float32 is 6 MiB, cache-sized.
CAST_ROWS = 4096


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
            parts.append(block_entries(s, lo, ks[lo:hi], floors))
    for lo, blk in kept:
        parts.append(block_entries(blk, lo, ks[lo:lo + blk.shape[1]], floors,
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

    key = path if storage.is_uri(path) else os.path.abspath(path)
    tag = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(path).stem}-{tag}"


def cache_file(cache_dir: str, path: str, dtype: str = "float16") -> Path:
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
    cached = cache_file(cache_dir, path, cache_dtype) if cache_dir else None
    if cached is not None and cached.is_file() and \
            cached.stat().st_mtime >= storage.mtime(path):
        arr = np.load(cached, mmap_mode="r")
        if arr.shape[1] != dim:
            raise StoreError(f"{cached}: cached vectors have dim {arr.shape[1]}, queries {dim}")
        for i in range(0, arr.shape[0], chunk_rows):
            yield arr[i:i + chunk_rows]  # a view of the mapped file: rows are contiguous
        return
    if cached is None:
        yield from _parquet_vectors(pf, path, chunk_rows, dim)
        return
    cached.parent.mkdir(parents=True, exist_ok=True)
    # a scan stopped early (the generator closed) or failing removes the partial copy
    with atomic_path(cached) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(cache_dtype),
                                        shape=(pf.metadata.num_rows, dim))
        off = 0
        for vec in _parquet_vectors(pf, path, chunk_rows, dim):
            out[off:off + len(vec)] = vec
            off += len(vec)
            yield vec
        out.flush()
        del out


def _parquet_vectors(pf: Any, path: str, chunk_rows: int, dim: int) -> Iterator[np.ndarray]:
    """The ``embedding`` column of one data file in chunks of ``chunk_rows`` rows."""
    for batch in pf.iter_batches(batch_size=chunk_rows, columns=["embedding"]):
        col = batch.column(0)
        if col.type.list_size != dim:
            raise StoreError(f"{path}: vectors have dim {col.type.list_size}, queries {dim}")
        yield col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


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
    mtime = storage.mtime(path)
    if files and all(f.is_file() and f.stat().st_mtime >= mtime for f in files.values()):
        cols = [np.load(files[c], mmap_mode="r") for c in _META]
        return cols[0][positions], cols[1][positions], cols[2][positions]
    table = pf.read(columns=list(_META))
    if files:
        for c, f in files.items():
            col = table.column(c).to_numpy(zero_copy_only=False)
            with atomic_path(f) as tmp, open(tmp, "wb") as fh:
                np.save(fh, col.astype(str) if c == "doc_id" else col)
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
        pf = storage.parquet_file(path)
        key = (group, k_shot, k_mean)
        floors = self.floors.get(key)
        if floors is None:
            floors = self.floors[key] = Floors(self.queries.shape[0], k_shot, k_mean)
        t0 = time.perf_counter()
        pool, leaked, n_leaked, num_rows = self._scan_chunks(pf, path, k_shot, k_mean, floors)
        leaks = self._resolve_positions(pf, path, pool, leaked)
        return {
            "num_rows": num_rows, "pool": pool, "n_leaked": n_leaked,
            "scan_seconds": time.perf_counter() - t0, "floors": floors.values(), **leaks,
        }

    def _scan_chunks(self, pf: Any, path: str, k_shot: int, k_mean: int, floors: Floors
                     ) -> tuple[Pool, tuple[list[np.ndarray], ...], int, int]:
        """Score every chunk of one file; returns its reduced pool (documents still shard
        positions), the leaked rows kept (positions, few-shot, similarity lists, up to about
        ``max_leaked``), how many rows leaked and the file's row count."""
        num_shots = self.queries.shape[0]
        pool = Pool()
        pending: list[Pool] = []
        leaked: tuple[list[np.ndarray], ...] = ([], [], [])
        n_leaked = 0
        offset = 0
        for vec in iter_vectors(pf, path, self.chunk_rows, self.queries.shape[1],
                                self.vector_cache, self.cache_dtype):
            n = vec.shape[0]
            cs = score_chunk(self._sims_fn(vec), num_shots, n, offset, k_shot, k_mean,
                             self.leakage_threshold, self.query_block, floors.values())
            floors.update(cs.q, cs.score)
            n_leaked += len(cs.leaked)
            if len(cs.leaked) and sum(len(x) for x in leaked[0]) < self.max_leaked:
                for kept, part in zip(leaked, (cs.leaked, cs.leaked_shot, cs.leaked_sim)):
                    kept.append(part)
            pending.append(_chunk_pool(cs, offset))
            # A merge sorts every entry: merge when the waiting entries outnumber the pool's
            # (once floors exist, chunks add ever fewer).
            if sum(len(p) for p in pending) > max(len(pool), num_shots * k_shot + k_mean):
                pool = _merge_positions([pool, *pending]).reduce(k_shot, k_mean)
                pending = []
            offset += n
        pool = _merge_positions([pool, *pending]).reduce(k_shot, k_mean)
        return pool, leaked, n_leaked, offset

    def _resolve_positions(self, pf: Any, path: str, pool: Pool,
                           leaked: tuple[list[np.ndarray], ...]) -> dict[str, np.ndarray]:
        """Resolve positions to doc ids / rows / text lengths (only for the candidates and the
        first ``max_leaked`` leaked rows), in ``pool`` in place; returns the leaked rows' part
        of the payload."""
        leaked_pos, leaked_shot, leaked_sim = leaked
        pos = pool.row
        leaked_rows = np.concatenate(leaked_pos)[: self.max_leaked] if leaked_pos else \
            np.zeros(0, np.int64)
        need = np.concatenate([pos, leaked_rows])
        if len(need):
            ids, rows, lens = read_meta(pf, path, self.vector_cache, need)
        else:
            ids, rows, lens = np.zeros(0, object), np.zeros(0, np.int64), np.zeros(0, np.int32)
        m = len(pos)
        pool.doc_id, pool.row, pool.text_len = ids[:m], rows[:m].astype(np.int64), \
            lens[:m].astype(np.int32)
        n = len(leaked_rows)
        return {
            "leaked_doc_id": ids[m:],
            "leaked_shot": np.concatenate(leaked_shot)[:n] if leaked_shot
            else np.zeros(0, np.int64),
            "leaked_sim": np.concatenate(leaked_sim)[:n] if leaked_sim
            else np.zeros(0, np.float32),
        }


def _chunk_pool(cs: ChunkScores, offset: int) -> Pool:
    """One chunk's entries as a pool whose documents are still shard positions."""
    upos, inv = np.unique(cs.pos, return_inverse=True)
    local = upos - offset
    return Pool(cs.q, inv.astype(np.int64), cs.score,
                upos.astype(object),  # positions stand in for ids until the end
                upos.astype(np.int64), np.zeros(len(upos), np.int32),
                cs.max_sim[local], cs.mean_sim[local])


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
