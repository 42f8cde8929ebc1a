"""Embedding stage: corpus shards -> Ray Data -> embedding actors -> Parquet embedding store.

The pipeline (lazy, one Ray Data plan per wave of shards)::

    from_items(shards) -> map_batches(read_shards)        task pool, streams each file
                       -> map_batches(Embedder)           actor pool, model loaded once/actor
                       -> map_batches(write_parts)        task pool, idempotent part files

After a wave, each finished shard's parts are merged into its data file (see
:mod:`craft_ray.store`). Resume: shards whose data file exists are skipped, half-done shards
are redone from scratch, so a killed run followed by a rerun gives the same store as an
uninterrupted one: no id lost, none doubled.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.models.embedder import (
    default_cache_dir,
    export_onnx,
    load_sentence_transformer,
    resolve_model,
)
from craft_ray.resources import actor_resources
from craft_ray.runtime import StageDir, StageStats, storage
from craft_ray.runtime.progress import report_progress
from craft_ray.stages.embed.actors import Embedder
from craft_ray.stages.embed.config import ERROR_REASONS, EmbedConfig, EmbedStageConfig
from craft_ray.stages.embed.shards import read_shards
from craft_ray.store.corpus import Shard, list_shards
from craft_ray.store.vectors import (
    ShardInfo,
    StoreInfo,
    data_path,
    export_h5,
    finalize_shard,
    manifest_path,
    parts_dir,
    write_info,
    write_part,
)

logger = logging.getLogger(__name__)

WRITE_NUM_CPUS = 0.25  # CPUs of a part-writing task


def write_parts(batch: dict[str, np.ndarray], store: str) -> dict[str, np.ndarray]:
    """Ray Data UDF: write a batch's vectors as one part per shard; return what was written."""
    corpora, shards, counts = [], [], []
    keys = list(zip(batch["corpus"], batch["shard"]))
    for corpus, shard in dict.fromkeys(keys):
        idx = np.array([i for i, k in enumerate(keys) if k == (corpus, shard)])
        write_part(store, str(corpus), str(shard), batch["row"][idx],
                   [str(d) for d in batch["doc_id"][idx]], batch["text_len"][idx],
                   np.stack(batch["embedding"][idx]) if batch["embedding"].dtype == object
                   else batch["embedding"][idx])
        corpora.append(str(corpus))
        shards.append(str(shard))
        counts.append(len(idx))
    return {"corpus": np.array(corpora, dtype=object), "shard": np.array(shards, dtype=object),
            "num_rows": np.array(counts, dtype=np.int64),
            "encode_s": np.full(len(counts), float(np.sum(batch["encode_s"])) / len(counts))}

# --- lazy dataset -------------------------------------------------------------------------


def model_cache_dir(cfg: EmbedConfig, stage_dir: str | Path) -> Path:
    """Where the embedder's exports live: ``embed.model_cache_dir``, else RUN_DIR/_models, or
    each node's own cache (``$CRAFT_RAY_CACHE``) when the run directory is an object store
    (an ONNX runtime loads a local folder; each node exports once)."""
    if cfg.model_cache_dir:
        return Path(cfg.model_cache_dir)
    if storage.is_uri(stage_dir):
        return default_cache_dir() / "models"
    return Path(storage.parent(stage_dir)) / "_models"


def max_actors(cfg: EmbedConfig) -> int:
    """The embedding pool's size (an autoscaling pool's maximum)."""
    return cfg.concurrency if isinstance(cfg.concurrency, int) else cfg.concurrency[1]


def pool_resources(cfg: EmbedConfig) -> tuple[float, int]:
    """(CPUs, torch threads) of an embedding actor, sized from the cluster's nodes with room
    for the readers and writers beside the pool; raises ResourceFitError when it cannot fit."""
    return actor_resources(
        cfg.num_cpus, max_actors(cfg), cfg.num_gpus, cfg.torch_threads, key="embed",
        task_cpus=max(cfg.read_num_cpus, WRITE_NUM_CPUS),
        min_size=cfg.concurrency if isinstance(cfg.concurrency, int) else cfg.concurrency[0])


def _readers(num_shards: int, cfg: EmbedConfig) -> int | None:
    """The readers' task-pool size: one per shard, kept different from the actor pool's size.

    Ray Data fuses a task pool into an actor pool when their sizes match (or none is given)
    and they ask the same CPUs (0.5 each: two actors on 2 CPUs). The fused operator bundled
    its input, the shards, by the embedder's batch_size (rows): a whole wave ran as one task
    on one actor while the others idled. With one shard and one actor, fused or not is the
    same, and None (no cap) is what Ray Data wants there.
    """
    if num_shards != max_actors(cfg):
        return num_shards
    return num_shards - 1 if num_shards > 1 else None


def embed_dataset(shards: list[Shard], cfg: EmbedConfig, store: str | Path,
                  stage_dir: str | Path) -> Any:
    """The lazy Ray Data plan embedding ``shards`` into part files of ``store``.

    Consuming the returned dataset (small rows: corpus, shard, num_rows per written part)
    does the work.
    """
    import ray.data

    items = [{"corpus": s.corpus, "path": s.path, "shard": s.shard} for s in shards]
    corpora = {c.name: c.model_dump(mode="json") for c in cfg.corpora}
    docs = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_shards, batch_size=1, num_cpus=cfg.read_num_cpus,
        compute=ray.data.TaskPoolStrategy(size=_readers(len(items), cfg)),
        fn_kwargs={"corpora": corpora, "store": str(store), "stage_dir": str(stage_dir),
                   "chunk_rows": cfg.read_chunk_rows},
    )
    cpus, threads = pool_resources(cfg)
    # At most 2 batches per actor (one running, one queued): the first actor ready does not
    # take every waiting batch (Ray Data's default queues 4) while a later one starts.
    low = cfg.concurrency if isinstance(cfg.concurrency, int) else cfg.concurrency[0]
    pool = ray.data.ActorPoolStrategy(min_size=low, max_size=max_actors(cfg),
                                      max_tasks_in_flight_per_actor=2)
    emb = docs.map_batches(
        Embedder, batch_size=cfg.batch_size, batch_format="numpy", compute=pool,
        num_gpus=cfg.num_gpus or None, num_cpus=cpus,
        fn_constructor_kwargs={
            "model": cfg.model, "max_seq_length": cfg.max_seq_length, "fp16": cfg.fp16,
            "encode_batch_size": cfg.encode_batch_size,
            "torch_threads": threads,
            "trust_remote_code": cfg.trust_remote_code,
            "backend": cfg.backend, "quantize": cfg.quantize,
            "cache_dir": str(model_cache_dir(cfg, stage_dir)),
        },
    )
    return emb.map_batches(write_parts, batch_size=None, batch_format="numpy",
                           num_cpus=WRITE_NUM_CPUS, fn_kwargs={"store": str(store)})

# --- stage runner -------------------------------------------------------------------------


def _model_dim(cfg: EmbedConfig) -> tuple[int, int | None]:
    from transformers import AutoConfig

    path = resolve_model(cfg.model)
    try:
        hidden = int(AutoConfig.from_pretrained(path).hidden_size)
    except Exception:  # an unusual architecture: load the real model once
        model = load_sentence_transformer(cfg.model, "cpu", cfg.max_seq_length, False)
        return int(model.get_sentence_embedding_dimension()), cfg.max_seq_length
    return hidden, cfg.max_seq_length


def preflight(stage_cfg: EmbedStageConfig, base_dir: str | Path | None = None) -> list[Shard]:
    """Check the inputs before Ray starts: every corpus path exists and holds readable shards,
    and the model is a known id or an existing folder. Returns the shards."""
    model = resolve_model(stage_cfg.embed.model)
    looks_local = model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]
    if looks_local and not os.path.exists(os.path.expanduser(model)):
        raise FileNotFoundError(
            f"embed.model {stage_cfg.embed.model!r} looks like a local path but does not exist; "
            "give an existing folder or a sentence-transformers hub id"
        )
    return [s for c in stage_cfg.embed.corpora for s in list_shards(c, base_dir)]


def _reset_if_changed(cfg: EmbedConfig, stage: StageDir, store: str, force: bool) -> None:
    """A changed config (or ``force``) discards the stage folder and a separate store."""
    from craft_ray.config import config_hash

    hash_file = stage.file("_config_hash")
    same_cfg = storage.is_file(hash_file) and \
        storage.read_text(hash_file).strip() == config_hash(cfg)
    if force or (not same_cfg and stage.exists()):
        if stage.exists():
            logger.warning("embed: config changed (or --force); discarding %s",
                           storage.redact(stage.location))
        storage.remove(stage.location)
        if cfg.store_dir:
            storage.remove(store)
    stage.begin(cfg)
    storage.write_text(hash_file, config_hash(cfg))


def _clear_unfinished(store: str, todo: list[Shard]) -> None:
    """Half-done shards start again from nothing: their parts and manifest go. One listing
    each (not a request per shard: an object store may hold thousands of shards)."""
    left = set(storage.list_files(storage.join(store, "_manifests"), recursive=True))
    left |= {storage.parent(f) for f in
             storage.list_files(storage.join(store, "_parts"), recursive=True)}
    for s in todo:
        for loc in (parts_dir(store, s.corpus, s.shard), manifest_path(store, s.corpus, s.shard)):
            if loc in left:
                storage.remove(loc)


def _embed_waves(todo: list[Shard], cfg: EmbedConfig, store: str, stage: StageDir
                 ) -> tuple[int, float]:
    """Embed shards a wave at a time, each finalised into the store; documents embedded, and
    the embedding actors' model seconds (summed over actors)."""
    import ray

    embedded_now = 0
    encode_s = 0.0
    waves = [todo[i:i + cfg.shards_per_wave] for i in range(0, len(todo), cfg.shards_per_wave)]
    finalize = ray.remote(num_cpus=0.5)(finalize_shard)
    for w, wave in enumerate(waves, 1):
        logger.info("embed: wave %d/%d (%d shards)", w, len(waves), len(wave))
        for row in embed_dataset(wave, cfg, store, stage.location).iter_rows():
            encode_s += float(row["encode_s"])
            report_progress(done=int(row["num_rows"]), unit="docs")
        embedded_now += sum(ray.get([finalize.remote(str(store), s.corpus, s.shard)
                                     for s in wave]))
    return embedded_now, encode_s


def _collect_manifests(shards: list[Shard], store: str, stats: StageStats) -> list[ShardInfo]:
    """Rows in/out and rejects of every shard (from its manifest) into stats; shard infos."""
    shard_infos = []
    reasons: Counter[str] = Counter()
    for s in shards:
        man = storage.read_json(manifest_path(store, s.corpus, s.shard))
        stats.rows_in += man["num_records"]
        stats.rows_out += man["num_docs"]
        reasons.update(man["rejects"])
        shard_infos.append(ShardInfo(
            corpus=s.corpus, shard=s.shard, num_rows=man["num_docs"],
            file=data_path(".", s.corpus, s.shard).replace(os.sep, "/").removeprefix("./")))
    stats.rejects = reasons
    return shard_infos


def run_embed(stage_cfg: EmbedStageConfig, *, base_dir: str | Path | None = None,
              force: bool = False) -> dict[str, Any]:
    """Run the embedding stage (Ray must be initialised). Returns the stage's stats.

    Skips work already done: a finished stage with the same config is not rerun (unless
    ``force``); within an unfinished one, shards with a data file are kept.
    """
    cfg = stage_cfg.embed
    stage = StageDir(stage_cfg.run_dir, "embed")
    if not force and stage.is_complete(cfg):
        logger.info("embed: already complete in %s (same config); skipping",
                    storage.redact(stage.location))
        return stage.read_stats()
    store = cfg.store_dir or stage.file("store")
    pool_resources(cfg)  # a pool that cannot fit the cluster fails here, before any work
    _reset_if_changed(cfg, stage, store, force)

    shards = [s for c in cfg.corpora for s in list_shards(c, base_dir)]
    finished = set(storage.list_files(storage.join(store, "data"), ".parquet", recursive=True))
    done = [s for s in shards if data_path(store, s.corpus, s.shard) in finished]
    todo = [s for s in shards if data_path(store, s.corpus, s.shard) not in finished]
    logger.info("embed: %d shards (%d already embedded, %d to do) -> %s",
                len(shards), len(done), len(todo), storage.redact(store))
    _clear_unfinished(store, todo)

    if cfg.backend == "onnx" and todo:  # export once here, not in every actor
        export_onnx(cfg.model, model_cache_dir(cfg, stage.location), cfg.trust_remote_code)
    stats = StageStats("embed")
    t_embed = time.time()
    embedded_now, encode_s = _embed_waves(todo, cfg, store, stage)
    seconds = time.time() - t_embed
    shard_infos = _collect_manifests(shards, store, stats)
    errors = sum(n for r, n in stats.rejects.items() if r in ERROR_REASONS)
    if stats.rows_in and errors / stats.rows_in > cfg.max_error_rate:
        raise RuntimeError(
            f"embed: {errors} of {stats.rows_in} records were malformed "
            f"({errors / stats.rows_in:.1%} > max_error_rate={cfg.max_error_rate}); see "
            f"{storage.redact(stage.file('rejects'))}. Fix the input or raise embed.max_error_rate."
        )
    dim, max_len = _model_dim(cfg)
    write_info(store, StoreInfo(
        model=cfg.model, dim=dim, max_seq_length=max_len, shards=shard_infos,
        corpora=[c.model_dump(mode="json") for c in cfg.corpora],
        shard_paths={f"{s.corpus}/{s.shard}": s.path for s in shards}))
    if cfg.export_h5:
        export_h5(store, stage.file("embeddings.h5"))
    stats.extra = {
        "shards": len(shards), "shards_resumed": len(done), "embedded_this_run": embedded_now,
        "embed_seconds_this_run": round(seconds, 3),
        # the actors' model time, summed over actors: the rest of the stage's time is Ray's
        # (read, schedule, write, finalise) where one actor runs
        "encode_seconds_this_run": round(encode_s, 3),
        "docs_per_s_this_run": round(embedded_now / seconds, 3) if seconds > 0 else None,
        "store": storage.redact(store), "model": cfg.model, "dim": dim,
    }
    return stage.finish(cfg, stats)
