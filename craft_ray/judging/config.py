"""The judge model and the generation backend serving it: shared by the judge stage, the
evaluate stage's generative sets, the filter's judge and rag_answer's evaluator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from craft_ray.backends.hf import HFBackendConfig
from craft_ray.backends.openai_compat import OpenAIBackendConfig
from craft_ray.backends.vllm import VLLMBackendConfig
from craft_ray.config import StrictModel


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
