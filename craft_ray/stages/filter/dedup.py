"""Deduplication that scales: exact, fuzzy (MinHash-LSH) and semantic (embedding cosine).

CRAFT compared every new sample with every kept one (``token_set_ratio >= 85``), which is
O(n^2) and, because it skipped a sample already in its ``seen`` set before comparing, let exact
duplicates through. Here every method is a *grouping* problem, so the work is linear in the
number of samples plus the number of duplicate candidates, and each step is a Ray Data shuffle
that spreads over a cluster:

1. **Exact** (:func:`normalized_hash`): NFKC, casefold, punctuation to spaces, whitespace
   collapsed, then a 128-bit BLAKE2b digest. ``groupby(hash)``: every group of identical
   normalised texts becomes a star of edges towards its smallest ``sample_id``. Two identical
   samples always share a group, so two identical samples are never both kept (a hash
   collision can only drop more, never keep a duplicate).
2. **Fuzzy** (:func:`minhash_signatures`, :func:`lsh_band_keys`): word n-gram shingles of the
   normalised text, hashed with a stable hash (not Python's salted ``hash``) vectorised in NumPy
   per batch, then ``bands x rows`` MinHash values per sample from datasketch. Each band's values
   hash to one 64-bit bucket key; rows are exploded to ``(bucket, sample_id)`` and grouped by
   bucket. Samples sharing any bucket are candidate duplicates (standard LSH; the S-curve
   threshold is about ``(1/bands) ** (1/rows)``, 0.61 Jaccard for the default 20 x 6). Because
   members of a bucket are a clique of candidates, a star of edges to the bucket's smallest id
   gives the same connected components as all pairs: at most ``bands`` edges per sample. Shuffle
   volume is ``n * bands`` small rows (an int64 key and an id), never the signatures. The banding
   is ours, not datasketch's ``MinHashLSH``: that is one in-process index, while bucket keys as
   int64 columns let a Ray ``groupby`` spread the buckets over a cluster.
3. **Semantic** (:func:`semantic_edges`): L2-normalised sentence embeddings (the embed stage's
   model); pairs with cosine >= threshold are duplicates. For large n the embeddings are first
   split by k-means into clusters (SemDeDup's trick) and compared pairwise only inside a cluster
   (``groupby(cluster)``), so cost is about ``n * cluster_size``; pairs split across clusters
   can be missed (set ``num_clusters: 1`` for exact search on small sets).

Edges from every step go to the driver, where :func:`components_keep_min` labels connected
components (SciPy ``connected_components``) and keeps the smallest ``sample_id`` of each one.
The result depends only on the set of samples, never on block order or the number of
workers. The driver holds only the edges (proportional to the number of duplicates), not the
samples; the drop list goes back to the workers as one object-store reference.

Every function here works on plain lists/arrays (tested without Ray); the ``*_dataset``
functions wire them into lazy Ray Data plans.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from craft_ray.config import StrictModel

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)

# --- configs -----------------------------------------------------------------------------


class ExactDedupConfig(StrictModel):
    """Exact dedup on normalised text."""

    enabled: bool = Field(default=True, description="Drop samples whose normalised text "
                          "equals another's (keeps the smallest sample_id).")


class FuzzyDedupConfig(StrictModel):
    """MinHash-LSH near-duplicate removal."""

    enabled: bool = Field(default=True, description="Drop near-duplicates (MinHash-LSH).")
    ngram: int = Field(default=1, ge=1, le=10,
                       description="Words per shingle. 1 (word sets) mirrors CRAFT's "
                       "token-set criterion on short generated samples; 3-5 suit long texts.")
    bands: int = Field(default=20, ge=1, le=512, description="LSH bands.")
    rows: int = Field(default=6, ge=1, le=64,
                      description="MinHash values per band; bands*rows = permutations. The "
                      "Jaccard threshold is about (1/bands)**(1/rows) (0.61 for 20 x 6).")
    min_band_matches: int = Field(
        default=2, ge=1, le=512,
        description="A candidate pair counts only if it shares at least this many band "
        "buckets: a cheap verification that needs no signatures after the shuffle. 1 is plain "
        "LSH (more false positives on short texts, whose unrelated pairs share many words).")
    max_bucket_members: int = Field(
        default=64, ge=2, le=100_000,
        description="Buckets up to this size give all their pairs; larger ones only a star "
        "to their smallest id (bounds the pair count).")
    seed: int = Field(default=1, ge=0, le=2**31, description="Seed of the hash permutations.")
    batch_size: int = Field(default=1024, ge=1, le=1_000_000,
                            description="Samples per MinHash batch.")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def threshold(self) -> float:
        """Jaccard at which the LSH S-curve rises steepest (about 50% detection)."""
        return float((1.0 / self.bands) ** (1.0 / self.rows))


class SemanticDedupConfig(StrictModel):
    """Embedding-cosine near-duplicate removal (embed stage's model)."""

    enabled: bool = Field(default=True, description="Drop semantic near-duplicates.")
    model: str = Field(default="sentence-transformers/all-MiniLM-L6-v2",
                       description="sentence-transformers model (same as the embed stage).")
    threshold: float = Field(default=0.95, gt=0, le=1,
                             description="Cosine similarity at or above which two samples "
                             "are duplicates.")
    max_seq_length: int | None = Field(default=256, ge=8, le=8192,
                                       description="Tokens per sample text.")
    batch_size: int = Field(default=512, ge=1, le=1_000_000,
                            description="Samples per embedding actor call.")
    encode_batch_size: int = Field(default=64, ge=1, le=65_536,
                                   description="Texts per forward pass.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per embedding actor.")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per embedding actor.")
    concurrency: int = Field(default=1, ge=1, le=10_000, description="Embedding actors.")
    fp16: bool = Field(default=True, description="float16 on GPU.")
    num_clusters: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="k-means clusters; pairs are compared only inside a cluster. Default: "
        "ceil(n / cluster_size).")
    cluster_size: int = Field(default=20_000, ge=100, le=10_000_000,
                              description="Target samples per cluster when num_clusters is "
                              "not set.")
    kmeans_sample: int = Field(default=200_000, ge=100, le=100_000_000,
                               description="Embeddings used to train k-means.")
    seed: int = Field(default=1, ge=0, le=2**31, description="k-means seed.")


class DedupConfig(StrictModel):
    """All three dedup steps."""

    shuffle_partitions: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Partitions of each groupby shuffle; default: one per 200k samples "
        "(at most 200).")

    exact: ExactDedupConfig = Field(default_factory=ExactDedupConfig,
                                    description="Exact (normalised-text hash) dedup.")
    fuzzy: FuzzyDedupConfig = Field(default_factory=FuzzyDedupConfig,
                                    description="MinHash-LSH dedup.")
    semantic: SemanticDedupConfig = Field(default_factory=SemanticDedupConfig,
                                          description="Embedding-cosine dedup.")

# --- text normalisation, exact hash ------------------------------------------------------


def normalize_text(text: str) -> str:
    """NFKC, casefold, non-word characters to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def normalized_hash(text: str) -> str:
    """Hex BLAKE2b-128 of :func:`normalize_text` (equal for texts differing only in case,
    punctuation or spacing)."""
    return hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=16).hexdigest()

# --- shingles and MinHash ----------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a stable, well-spread 64-bit hash of uint64 values."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def shingles_batch(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Word n-gram hashes of many texts at once: (flat uint64 hashes, shingles per text).

    Tokens of the normalised text are hashed with CRC32 (stable across processes, unlike
    ``hash``); an n-gram's hash mixes its token hashes in order. A text shorter than ``ngram``
    words gives one shingle (all its words). Vectorised over the whole batch.
    """
    token_lists = [normalize_text(t).split() or [""] for t in texts]
    lens = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    tok = np.fromiter((zlib.crc32(w.encode("utf-8")) for ws in token_lists for w in ws),
                      dtype=np.uint64, count=int(lens.sum()))
    doc_start = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
    doc_end = doc_start + lens
    nwin = np.maximum(1, lens - ngram + 1)
    win_doc = np.repeat(np.arange(len(lens)), nwin)
    starts = np.arange(int(nwin.sum())) - np.repeat(np.cumsum(nwin) - nwin, nwin) \
        + doc_start[win_doc]
    acc = np.zeros(len(starts), dtype=np.uint64)
    for k in range(ngram):
        idx = starts + k
        valid = idx < doc_end[win_doc]
        acc = _mix64(acc ^ np.where(valid, tok[np.minimum(idx, len(tok) - 1)], np.uint64(0)))
    return acc, nwin


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Sorted unique stable uint64 hashes of the word n-grams of one text."""
    return np.unique(shingles_batch([text], ngram)[0])


def _shingle_value(x: int) -> int:
    """datasketch's hash function here: shingles arrive already hashed to 32 bits."""
    return x


def minhash_signatures(texts: Sequence[str], num_perm: int, ngram: int, seed: int = 1
                       ) -> np.ndarray:
    """MinHash signatures ``uint32 [len(texts), num_perm]``, computed by datasketch.

    Shingles are hashed once, vectorised over the batch (:func:`shingles_batch`, top 32 bits
    of the stable 64-bit hash); datasketch's ``MinHash.bulk`` (scheme ``affine32``: a
    MurmurHash3 pre-mix, then ``a*h + b mod 2**32`` per permutation) takes the minimum per
    permutation. Deterministic for the same (texts, num_perm, ngram, seed). The fraction of
    equal positions of two signatures estimates the Jaccard similarity of their shingle sets.
    """
    from datasketch import MinHash

    sigs = np.empty((len(texts), num_perm), dtype=np.uint32)
    if not len(texts):
        return sigs
    flat, lens = shingles_batch(texts, ngram)
    flat = (flat >> np.uint64(32)).tolist()
    bounds = np.concatenate(([0], np.cumsum(lens))).tolist()
    per_text = (flat[bounds[i]:bounds[i + 1]] for i in range(len(texts)))
    for i, m in enumerate(MinHash.generator(per_text, num_perm=num_perm, seed=seed,
                                            hashfunc=_shingle_value)):
        sigs[i] = m.hashvalues
    return sigs


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal MinHash values: an unbiased estimate of Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def lsh_band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One int64 bucket key per band ``[n, bands]``; the band index is mixed in, so equal
    values in different bands never share a bucket."""
    n = sigs.shape[0]
    if sigs.shape[1] < bands * rows:
        raise ValueError(f"signatures have {sigs.shape[1]} values, need bands*rows="
                         f"{bands * rows}")
    block = sigs[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    acc = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64), (n, bands)).copy()
    with np.errstate(over="ignore"):
        for r in range(rows):
            acc = _mix64(acc ^ block[:, :, r])
    return acc.view(np.int64)

# --- connected components ----------------------------------------------------------------


def components_keep_min(edges_a: Sequence[str] | np.ndarray, edges_b: Sequence[str] | np.ndarray
                        ) -> dict[str, str]:
    """Connected components of the undirected graph given by the edges.

    Returns ``{dropped_id: kept_id}`` for every id in a component of two or more, where
    ``kept_id`` is the component's smallest id (string order). Ids not listed are kept.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.asarray(edges_a, dtype=object)
    b = np.asarray(edges_b, dtype=object)
    if len(a) == 0:
        return {}
    # np.unique sorts, so node index order == string order and min index == min id.
    nodes, inv = np.unique(np.concatenate([a, b]).astype(str), return_inverse=True)
    ia, ib = inv[: len(a)], inv[len(a):]
    n = len(nodes)
    graph = coo_matrix((np.ones(len(ia), dtype=np.int8), (ia, ib)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    root = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(root, labels, np.arange(n))
    keep = root[labels]
    dropped = np.nonzero(keep != np.arange(n))[0]
    return {str(nodes[i]): str(nodes[keep[i]]) for i in dropped}


def group_star_edges(ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Edges from every member of a group to its smallest id (no edges for a singleton)."""
    uniq = sorted(set(map(str, ids)))
    if len(uniq) < 2:
        return [], []
    return uniq[1:], [uniq[0]] * (len(uniq) - 1)


def group_pairs(ids: Sequence[str], max_members: int) -> tuple[list[str], list[str]]:
    """Candidate pairs ``(a, b)``, ``a < b``, of one bucket: all pairs when the bucket has at
    most ``max_members`` ids, else a star from the smallest id (so the output stays linear)."""
    uniq = sorted(set(map(str, ids)))
    if len(uniq) < 2:
        return [], []
    if len(uniq) > max_members:
        return [uniq[0]] * (len(uniq) - 1), uniq[1:]
    a = [x for i, x in enumerate(uniq) for _ in range(len(uniq) - i - 1)]
    b = [y for i in range(len(uniq)) for y in uniq[i + 1:]]
    return a, b


def verified_pairs(a: Sequence[str], b: Sequence[str], min_matches: int
                   ) -> tuple[list[str], list[str]]:
    """Pairs that occur at least ``min_matches`` times (once per shared band bucket)."""
    counts = Counter(zip(a, b))
    kept = [p for p, c in counts.items() if c >= min_matches]
    return [p[0] for p in kept], [p[1] for p in kept]

# --- in-process dedup (plain functions; used by tests and the benchmark) -----------------


def exact_duplicates(ids: Sequence[str], texts: Sequence[str]) -> dict[str, str]:
    """``{dropped_id: kept_id}`` for samples whose normalised text equals a smaller id's."""
    groups: dict[str, list[str]] = {}
    for sid, text in zip(ids, texts):
        groups.setdefault(normalized_hash(text), []).append(str(sid))
    ea: list[str] = []
    eb: list[str] = []
    for members in groups.values():
        x, y = group_star_edges(members)
        ea += x
        eb += y
    return components_keep_min(ea, eb)


def lsh_candidate_pairs(ids: Sequence[str], keys: np.ndarray, max_members: int
                        ) -> tuple[list[str], list[str]]:
    """Candidate pairs of every LSH bucket (one entry per shared bucket; see
    :func:`group_pairs`)."""
    ids_arr = np.asarray(ids, dtype=str)
    n, bands = keys.shape
    flat_keys = keys.T.ravel()
    flat_ids = np.tile(ids_arr, bands)
    order = np.argsort(flat_keys, kind="stable")
    k, s = flat_keys[order], flat_ids[order]
    bounds = np.flatnonzero(np.diff(k)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(k)]))
    a: list[str] = []
    b: list[str] = []
    for lo, hi in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        x, y = group_pairs(s[lo:hi].tolist(), max_members)
        a += x
        b += y
    return a, b


def lsh_edges(ids: Sequence[str], keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges of all LSH buckets (``keys`` from :func:`lsh_band_keys`), vectorised."""
    ids_arr = np.asarray(ids, dtype=str)
    n, bands = keys.shape
    flat_keys = keys.T.ravel()  # band-major, so equal keys cluster per band after sorting
    flat_ids = np.tile(ids_arr, bands)
    order = np.lexsort((flat_ids, flat_keys))
    k, s = flat_keys[order], flat_ids[order]
    start = np.ones(len(k), dtype=bool)
    start[1:] = k[1:] != k[:-1]
    head = np.maximum.accumulate(np.where(start, np.arange(len(k)), 0))
    mask = ~start & (s != s[head])
    return s[mask], s[head][mask]


def fuzzy_duplicates(ids: Sequence[str], texts: Sequence[str], cfg: FuzzyDedupConfig
                     ) -> dict[str, str]:
    """``{dropped_id: kept_id}`` for MinHash-LSH near-duplicate components (in process)."""
    sigs = minhash_signatures(texts, cfg.num_perm, cfg.ngram, cfg.seed)
    keys = lsh_band_keys(sigs, cfg.bands, cfg.rows)
    if cfg.min_band_matches <= 1:
        return components_keep_min(*lsh_edges(ids, keys))
    a, b = lsh_candidate_pairs(ids, keys, cfg.max_bucket_members)
    return components_keep_min(*verified_pairs(a, b, cfg.min_band_matches))


def semantic_pairs(emb: np.ndarray, threshold: float, chunk: int = 2048
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, whose cosine (rows L2-normalised) >= threshold."""
    x = np.asarray(emb, dtype=np.float32)
    ii: list[np.ndarray] = []
    jj: list[np.ndarray] = []
    for s in range(0, len(x), chunk):
        sim = x[s:s + chunk] @ x.T
        r, c = np.nonzero(sim >= threshold)
        r = r + s
        keep = c > r
        ii.append(r[keep])
        jj.append(c[keep])
    if not ii:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(ii), np.concatenate(jj)


def semantic_edges(ids: Sequence[str], emb: np.ndarray, threshold: float
                   ) -> tuple[list[str], list[str]]:
    """Id edges between samples whose embeddings have cosine >= threshold."""
    i, j = semantic_pairs(emb, threshold)
    ids_l = [str(x) for x in ids]
    return [ids_l[k] for k in i], [ids_l[k] for k in j]


def shuffle_partitions(ds: Any, configured: int | None = None) -> int:
    """Partitions of a groupby: as configured, else one per 200k rows (1..200).

    Ray's default (200) costs seconds of task start-up on small data for nothing.
    """
    if configured:
        return configured
    return max(1, min(200, -(-ds.count() // 200_000)))
