"""Budgets, candidate pools and ranking by mean similarity (pure numpy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from craft_ray.stages.retrieve.config import MEAN, Mode

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


def block_entries(s: np.ndarray, lo: int, ks: np.ndarray, floors: np.ndarray | None,
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
