"""Config of the retrieve stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from craft_ray.config import RayConfig, StrictModel
from craft_ray.tasks.fewshots import FewShotConfig

Mode = Literal["per_shot", "mean", "mixed"]

# Row `q` of a candidate entry for the list of the mean similarity (per-shot lists use 0..F-1).
MEAN = -1


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
