"""The vllm backend of the evaluate stage: ray.data.llm processor configs, requests and scores."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from craft_ray.evalsets.base import LETTERS
from craft_ray.models.tokenizers import engine_ref
from craft_ray.stages.evaluate.config import EvaluateConfig, ModelSpec
from craft_ray.stages.evaluate.scoring import score_columns, scores_from_logprobs

# --- vllm backend ----------------------------------------------------------------------------


def vllm_processor_config(cfg: EvaluateConfig, model: ModelSpec) -> Any:
    """The ``ray.data.llm`` vLLM processor config scoring one token with top-k logprobs."""
    from ray.data.llm import vLLMEngineProcessorConfig

    engine: dict[str, Any] = {
        "max_logprobs": cfg.vllm.top_logprobs,
        "tensor_parallel_size": cfg.vllm.tensor_parallel_size,
        "gpu_memory_utilization": cfg.vllm.gpu_memory_utilization,
        "enable_prefix_caching": True,
    }
    if cfg.vllm.max_model_len:
        engine["max_model_len"] = cfg.vllm.max_model_len
    if model.adapter:
        engine.update(enable_lora=True, max_lora_rank=cfg.vllm.max_lora_rank, max_loras=1)
    engine.update(cfg.vllm.engine_kwargs)
    return vLLMEngineProcessorConfig(
        # an s3:// / gs:// model stays a URI: Ray Data LLM downloads it on each engine's node
        model_source=engine_ref(model.model), engine_kwargs=engine,
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency, accelerator_type=None,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
    )


def vllm_request(row: dict[str, Any], top_logprobs: int, adapter: str | None
                 ) -> dict[str, Any]:
    """Preprocess: one greedy token with its top-k logprobs (the adapter as a LoRA request)."""
    out = dict(row)
    out["sampling_params"] = {"temperature": 0.0, "max_tokens": 1, "logprobs": top_logprobs}
    if adapter:
        out["model"] = adapter
    return out


def vllm_scores(row: dict[str, Any], letter_ids: dict[str, list[int]]) -> dict[str, Any]:
    """Postprocess: letter scores from the first generated token's logprobs."""
    first: Any = {}
    lps = row.get("logprobs")
    if lps is not None and len(lps) > 0:
        first = lps[0] or {}
    if isinstance(first, list):  # [{"token_id"|"id": i, "logprob": x}, ...] after a round trip
        first = {d.get("token_id", d.get("id")): d for d in first if isinstance(d, Mapping)}
    scores = scores_from_logprobs(first, LETTERS, letter_ids)
    keep = {k: v for k, v in row.items()
            if k not in ("logprobs", "prompt_logprobs", "sampling_params", "generated_tokens",
                         "metrics", "model", "tokenized_prompt", "prompt_token_ids")}
    cols = score_columns([scores], [row["letters"]])
    keep.update({k: v[0] for k, v in cols.items()})
    keep["prompt_tokens"] = int(row.get("num_input_tokens") or 0)
    return keep


def vllm_generation_config(cfg: EvaluateConfig, model: ModelSpec) -> Any:
    """The generation backend's vLLM settings (craft_ray.backends.vllm) for one model: the
    adapter is served as a LoRA request, so base and adapter share the engine settings."""
    from craft_ray.backends.vllm import VLLMBackendConfig

    engine: dict[str, Any] = {}
    if cfg.vllm.max_model_len:
        engine["max_model_len"] = cfg.vllm.max_model_len
    if model.adapter:
        engine.update(enable_lora=True, max_lora_rank=cfg.vllm.max_lora_rank, max_loras=1)
    engine.update(cfg.vllm.engine_kwargs)
    return VLLMBackendConfig(
        tensor_parallel_size=cfg.vllm.tensor_parallel_size,
        gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
        concurrency=cfg.concurrency, batch_size=cfg.batch_size, engine_kwargs=engine)


def vllm_generation_request(row: dict[str, Any], sampling: dict[str, Any],
                            adapter: str | None) -> dict[str, Any]:
    """Preprocess: the backend's request (token ids in, sampling params) + the LoRA adapter."""
    from craft_ray.backends.vllm import preprocess

    out = preprocess(row, sampling)
    if adapter:
        out["model"] = adapter
    return out
