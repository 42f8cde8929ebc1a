"""Config of the judge stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from craft_ray.backends.hf import HFBackendConfig
from craft_ray.backends.openai_compat import OpenAIBackendConfig
from craft_ray.backends.vllm import VLLMBackendConfig
from craft_ray.config import RayConfig, StrictModel
from craft_ray.stages.judge.pairwise import JUDGE_TEMPLATE

# --- the judge stage: any generation backend -------------------------------------------------


class JudgeModelConfig(StrictModel):
    """The judge model and the generation backend serving it (greedy, short answers)."""

    backend: Literal["hf", "openai", "vllm"] = Field(
        default="hf", description="Generation backend (craft_ray.backends): hf, openai, vllm."
    )
    model: str = Field(min_length=1, description="Judge model: HF id or local path (hf, vllm); "
                       "the served name (openai). CRAFT: Llama-3-70B-Instruct.")
    tokenizer: str | None = Field(
        default=None, description="Tokenizer rendering the chat prompt (default: the model; "
        "none for openai chat).")
    system_prompt: str | None = Field(default=None, description="Optional system turn.")
    max_new_tokens: int = Field(default=50, ge=1, le=4096,
                                description="Judge answer budget (CRAFT: 50).")
    hf: HFBackendConfig = Field(default_factory=lambda: HFBackendConfig(),
                                description="hf backend settings.")
    openai: OpenAIBackendConfig = Field(default_factory=lambda: OpenAIBackendConfig(),
                                        description="openai backend settings.")
    vllm: VLLMBackendConfig = Field(default_factory=lambda: VLLMBackendConfig(),
                                    description="vllm backend settings.")


class JudgeConfig(StrictModel):
    """Config of ``craft-ray judge``: win rate of predictions against references."""

    name: str = Field(default="judge", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Output folder name under RUN_DIR/evaluate/judge.")
    input_path: str = Field(
        min_length=1,
        description="Per-item predictions (.jsonl or .parquet) with an instruction, the model's "
        "prediction and the reference (CRAFT's evaluation output format).")
    instruction_field: str = Field(default="instruction", min_length=1,
                                   description="Column of the instruction.")
    prediction_field: str = Field(default="prediction", min_length=1,
                                  description="Column of the model's output.")
    reference_field: str = Field(default="reference", min_length=1,
                                 description="Column of the reference output.")
    limit: int | None = Field(default=None, ge=1, description="Judge only the first N items.")
    seed: int = Field(default=1234, ge=0, le=2**31 - 1,
                      description="Seed of the random order swap (CRAFT: 1234).")
    template: str = Field(default=JUDGE_TEMPLATE, min_length=1,
                          description="Judge prompt with {instruction}, {output_1}, {output_2}.")
    judge: JudgeModelConfig = Field(description="The judge model and its backend.")
    output_dir: str | None = Field(default=None, description="Default RUN_DIR/evaluate/judge.")


class JudgeStageConfig(StrictModel):
    """A YAML file for ``craft-ray judge``: common keys plus the ``judge`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    judge: JudgeConfig
