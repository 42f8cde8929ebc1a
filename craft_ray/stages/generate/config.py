"""Config of the generate stage."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from craft_ray.backends.hf import HFBackendConfig
from craft_ray.backends.openai_compat import OpenAIBackendConfig
from craft_ray.backends.vllm import VLLMBackendConfig
from craft_ray.config import RayConfig, StrictModel
from craft_ray.tasks.base import Task, TaskError
from craft_ray.tasks.custom import CustomTaskConfig
from craft_ray.tasks.fewshots import FewShotConfig
from craft_ray.tasks.registry import get_task


class GenerateConfig(StrictModel):
    """Config of ``craft-ray generate``."""

    task: str | CustomTaskConfig = Field(
        description="A built-in task (bioqa, medqa, csqa, recipegen, summarization) or a "
        "custom task (name, meta_instruction, fields or json_schema, ...)."
    )
    fewshots: FewShotConfig = Field(description="The human few-shots shown in the prompts.")
    input_path: str | None = Field(
        default=None,
        description="Corpus samples (Parquet or JSONL with doc_id, text[, corpus, "
        "fewshot_ids]). Default: RUN_DIR/retrieve/corpus_samples.parquet.",
    )
    limit: int | None = Field(default=None, ge=1, description="Use only the first N documents.")
    samples_per_doc: int = Field(
        default=1, ge=1, le=64,
        description="Prompts per document, each with its own few-shot draw (CRAFT: 1).",
    )
    num_shots: int = Field(default=3, ge=0, le=64, description="Few-shots per prompt (CRAFT: 3).")
    fewshot_text_max_chars: int | None = Field(
        default=None, ge=50, le=10_000_000,
        description="Shorten each few-shot's text to about this many characters (cut at a "
        "word boundary) for small-context generators. None: as written (CRAFT).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of few-shot draws and sampling.")
    backend: Literal["hf", "openai", "vllm"] = Field(
        default="hf",
        description="hf: transformers on CPU/one GPU; openai: an OpenAI-compatible server; "
        "vllm: vLLM engines via ray.data.llm (GPU clusters).",
    )
    model: str = Field(
        description="Generator: HF model id or local path (hf, vllm); the served model name "
        "(openai). CRAFT: mistralai/Mistral-7B-Instruct-v0.2."
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer (id or path) whose chat template renders the prompts and counts "
        "tokens. Default: the model (hf, vllm); none for openai chat (no length rule then).",
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, le=131_072,
        description="Generated tokens per sample. Default: CRAFT's per task (bioqa 1536, medqa "
        "256, csqa 256, recipegen 1280, summarization 1536).",
    )
    temperature: float = Field(default=0.7, ge=0, le=5, description="Sampling temperature "
                               "(CRAFT 0.7; 0 = greedy).")
    top_p: float = Field(default=0.9, gt=0, le=1, description="Nucleus sampling (CRAFT 0.9).")
    top_k: int = Field(default=40, ge=-1, le=100_000, description="Top-k (CRAFT 40; -1 off).")
    guided_decoding: bool = Field(
        default=True,
        description="Constrain generation to the task's JSON schema (xgrammar for hf, "
        "structured outputs for vllm, response_format for openai).",
    )
    guided_max_string_chars: int | None = Field(
        default=None, ge=1, le=1_000_000,
        description="With guided decoding: cap every free string of the schema at this many "
        "characters (bounds runaway strings; None: no cap).",
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=16, le=10_000_000,
        description="Longest prompt allowed. Default: the model's context minus "
        "max_new_tokens (CRAFT filtered prompts above 16384 tokens).",
    )
    long_prompt: Literal["truncate_text", "drop"] = Field(
        default="truncate_text",
        description="A prompt over max_prompt_tokens: truncate the document text to fit, or "
        "drop the prompt (CRAFT dropped). Both are counted in stats.",
    )
    min_text_tokens: int = Field(
        default=64, ge=1, le=1_000_000,
        description="Truncation never leaves fewer document tokens than this (else: drop).",
    )
    prompt_batch_size: int = Field(default=64, ge=1, le=100_000,
                                   description="Documents per prompt-building call.")
    prompt_concurrency: int = Field(default=1, ge=1, le=1024,
                                    description="Prompt-building actors.")
    max_error_rate: float = Field(
        default=0.5, ge=0, le=1,
        description="Fail the stage (after writing outputs) when more than this fraction of "
        "generations failed in the backend (server errors, timeouts, engine errors).",
    )
    hf: HFBackendConfig = Field(default_factory=HFBackendConfig,
                                description="Settings of the hf backend.")
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig,
                                        description="Settings of the openai backend.")
    vllm: VLLMBackendConfig = Field(default_factory=VLLMBackendConfig,
                                    description="Settings of the vllm backend.")

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | CustomTaskConfig) -> str | CustomTaskConfig:
        try:
            get_task(v)
        except TaskError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _backend_needs(self) -> GenerateConfig:
        if self.backend == "openai" and self.openai.api == "completions" and not self.tokenizer:
            raise ValueError(
                "openai.api=completions sends a locally rendered prompt: set generate.tokenizer "
                "to the served model's tokenizer (or use openai.api=chat)"
            )
        return self

    def task_obj(self) -> Task:
        """The configured :class:`Task`."""
        return get_task(self.task)

    def tokenizer_name(self) -> str | None:
        """Tokenizer used to render and count prompts (None: none available)."""
        if self.tokenizer:
            return self.tokenizer
        return None if self.backend == "openai" else self.model

    def sampling(self) -> dict[str, Any]:
        """Sampling settings handed to the backends."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "guided": self.guided_decoding}


class GenerateStageConfig(StrictModel):
    """A YAML file for ``craft-ray generate``: common keys plus the ``generate`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    generate: GenerateConfig
