"""Deduplication over a ray.data.Dataset: the per-batch steps and the shuffles that group
candidates.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from craft_ray.stages.filter.dedup import (
    FuzzyDedupConfig,
    SemanticDedupConfig,
    components_keep_min,
    group_pairs,
    group_star_edges,
    lsh_band_keys,
    minhash_signatures,
    normalized_hash,
    semantic_edges,
    shuffle_partitions,
)

logger = logging.getLogger(__name__)


# --- Ray Data batch functions -------------------------------------------------------------


def exact_key_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data UDF: ``sample_id, sample_text`` -> ``key`` (normalised hash), ``sample_id``."""
    keys = np.array([normalized_hash(str(t)) for t in batch["sample_text"]], dtype=object)
    return {"key": keys, "sample_id": np.asarray(batch["sample_id"], dtype=object)}


def lsh_key_batch(batch: dict[str, np.ndarray], cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ray Data UDF: one row per (band bucket, sample): ``key`` (int64), ``sample_id``."""
    c = FuzzyDedupConfig.model_validate(cfg)
    texts = [str(t) for t in batch["sample_text"]]
    sigs = minhash_signatures(texts, c.num_perm, c.ngram, c.seed)
    keys = lsh_band_keys(sigs, c.bands, c.rows)
    ids = np.asarray(batch["sample_id"], dtype=object)
    return {"key": keys.ravel(), "sample_id": np.repeat(ids, c.bands)}


def group_pairs_batch(group: dict[str, np.ndarray], max_members: int
                      ) -> dict[str, np.ndarray]:
    """Ray Data ``map_groups`` UDF: candidate pairs of one LSH bucket."""
    a, b = group_pairs(group["sample_id"], max_members)
    return {"dup": np.array(b, dtype=object), "keep": np.array(a, dtype=object)}


def group_edges_batch(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data ``map_groups`` UDF: star edges ``dup -> keep`` of one key group."""
    a, b = group_star_edges(group["sample_id"])
    return {"dup": np.array(a, dtype=object), "keep": np.array(b, dtype=object)}


def semantic_group_batch(group: dict[str, np.ndarray], threshold: float
                         ) -> dict[str, np.ndarray]:
    """Ray Data ``map_groups`` UDF: cosine >= threshold pairs inside one k-means cluster."""
    emb = np.stack(group["embedding"]) if group["embedding"].dtype == object \
        else np.asarray(group["embedding"])
    a, b = semantic_edges(group["sample_id"], emb, threshold)
    return {"dup": np.array(a, dtype=object), "keep": np.array(b, dtype=object)}


class SemanticEmbedder:
    """Ray Data actor: loads the sentence-transformers model once, embeds sample texts."""

    def __init__(self, model: str, max_seq_length: int | None, fp16: bool,
                 encode_batch_size: int, torch_threads: int) -> None:
        import torch

        from craft_ray.models.embedder import load_sentence_transformer

        torch.set_num_threads(torch_threads)
        self.model = load_sentence_transformer(model, None, max_seq_length, fp16)
        self.encode_batch_size = encode_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from craft_ray.models.embedder import encode_texts

        vec = encode_texts(self.model, [str(t) for t in batch["sample_text"]],
                           self.encode_batch_size)
        return {"sample_id": np.asarray(batch["sample_id"], dtype=object),
                "embedding": vec.astype(np.float32)}


def assign_clusters_batch(batch: dict[str, np.ndarray], centroids: Any
                          ) -> dict[str, np.ndarray]:
    """Ray Data UDF: nearest k-means centroid (inner product) of each embedding."""
    import ray

    cents = ray.get(centroids) if isinstance(centroids, ray.ObjectRef) else centroids
    emb = np.asarray(batch["embedding"], dtype=np.float32)
    cluster = np.argmax(emb @ cents.T, axis=1).astype(np.int64) if len(emb) else \
        np.empty(0, dtype=np.int64)
    return {"sample_id": batch["sample_id"], "embedding": emb, "cluster": cluster}

# --- Ray Data plans -----------------------------------------------------------------------


def _collect_edges(edges_ds: Any) -> tuple[list[str], list[str]]:
    a: list[str] = []
    b: list[str] = []
    for batch in edges_ds.iter_batches(batch_size=65_536, batch_format="numpy"):
        a.extend(map(str, batch["dup"]))
        b.extend(map(str, batch["keep"]))
    return a, b


def exact_duplicates_dataset(ds: Any, num_partitions: int | None = None) -> dict[str, str]:
    """``{dropped: kept}`` over a Ray Dataset with ``sample_id, sample_text`` (one shuffle)."""
    keys = ds.select_columns(["sample_id", "sample_text"]).map_batches(
        exact_key_batch, batch_format="numpy")
    edges = keys.groupby("key", num_partitions=shuffle_partitions(ds, num_partitions)) \
        .map_groups(group_edges_batch, batch_format="numpy")
    return components_keep_min(*_collect_edges(edges))


def fuzzy_duplicates_dataset(ds: Any, cfg: FuzzyDedupConfig, num_partitions: int | None = None
                             ) -> dict[str, str]:
    """``{dropped: kept}`` of MinHash-LSH components over a Ray Dataset (one shuffle)."""
    keys = ds.select_columns(["sample_id", "sample_text"]).map_batches(
        lsh_key_batch, batch_size=cfg.batch_size, batch_format="numpy",
        fn_kwargs={"cfg": cfg.model_dump()})
    parts = shuffle_partitions(ds, num_partitions)
    if cfg.min_band_matches <= 1:
        edges = keys.groupby("key", num_partitions=parts).map_groups(group_edges_batch,
                                                                     batch_format="numpy")
        return components_keep_min(*_collect_edges(edges))
    pairs = keys.groupby("key", num_partitions=parts).map_groups(
        group_pairs_batch, batch_format="numpy",
        fn_kwargs={"max_members": cfg.max_bucket_members})
    # One row per shared bucket; the second shuffle counts them per pair.
    counted = pairs.groupby(["dup", "keep"], num_partitions=parts).count()
    a: list[str] = []
    b: list[str] = []
    for batch in counted.iter_batches(batch_size=65_536, batch_format="numpy"):
        ok = batch["count()"] >= cfg.min_band_matches
        a.extend(map(str, batch["dup"][ok]))
        b.extend(map(str, batch["keep"][ok]))
    return components_keep_min(a, b)


def semantic_duplicates_dataset(ds: Any, cfg: SemanticDedupConfig,
                                num_partitions: int | None = None) -> dict[str, str]:
    """``{dropped: kept}`` of embedding-cosine components over a Ray Dataset.

    Embeds with an actor pool (model loaded once per actor), trains k-means on a sample of the
    embeddings on the driver when more than one cluster is needed, then compares pairs only
    inside each cluster (``groupby(cluster)``).
    """
    import ray

    from craft_ray.resources import actor_resources

    actor_resources(cfg.num_cpus, cfg.concurrency, cfg.num_gpus,  # fails first if it can't fit
                    key="filter.dedup.semantic")
    emb = ds.select_columns(["sample_id", "sample_text"]).map_batches(
        SemanticEmbedder, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=cfg.num_gpus or None, num_cpus=cfg.num_cpus,
        fn_constructor_kwargs={"model": cfg.model, "max_seq_length": cfg.max_seq_length,
                               "fp16": cfg.fp16, "encode_batch_size": cfg.encode_batch_size,
                               "torch_threads": max(1, int(cfg.num_cpus))},
    ).materialize()
    n = emb.count()
    if n < 2:
        return {}
    k = cfg.num_clusters or max(1, -(-n // cfg.cluster_size))
    k = min(k, n)
    if k == 1:
        centroids = np.zeros((1, 1), dtype=np.float32)
        clustered = emb.map_batches(_single_cluster_batch, batch_format="numpy")
    else:
        import faiss

        train = np.concatenate([
            np.asarray(b["embedding"], dtype=np.float32)
            for b in emb.limit(cfg.kmeans_sample).iter_batches(batch_size=65_536,
                                                               batch_format="numpy")])
        km = faiss.Kmeans(train.shape[1], k, niter=20, seed=cfg.seed, spherical=True,
                          verbose=False)
        km.train(train)
        centroids = ray.put(np.asarray(km.centroids, dtype=np.float32))
        clustered = emb.map_batches(assign_clusters_batch, batch_format="numpy",
                                    fn_kwargs={"centroids": centroids})
    logger.info("semantic dedup: %d samples in %d cluster(s)", n, k)
    parts = min(k, num_partitions or max(1, min(200, k)))
    edges = clustered.groupby("cluster", num_partitions=parts).map_groups(
        semantic_group_batch, batch_format="numpy", fn_kwargs={"threshold": cfg.threshold})
    return components_keep_min(*_collect_edges(edges))


def _single_cluster_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"sample_id": batch["sample_id"], "embedding": batch["embedding"],
            "cluster": np.zeros(len(batch["sample_id"]), dtype=np.int64)}
