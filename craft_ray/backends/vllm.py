"""``vllm`` backend: vLLM engines as a Ray Data actor pool through ``ray.data.llm``.

Prompts arrive already rendered with the generator's chat template and tokenized (by
:mod:`craft_ray.stages.generate`), so ``ray.data.llm``'s own chat-template and tokenize stages are
switched off and the token ids go straight to the engine (no second BOS, and the length rule
applied when building prompts is exactly what the engine sees). JSON-schema guided decoding
uses vLLM's structured outputs (``sampling_params.structured_outputs.json``). As in the ``hf``
backend, JSON is decoded without free whitespace by default (``guided_any_whitespace: false``):
vLLM's xgrammar backend reads that switch from the engine's ``structured_outputs_config``
(``disable_any_whitespace``), its guidance backend from the request, so both are set.

vLLM is imported only when the processor is built (GPU machines: ``pip install craft-ray[gpu]``).
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import Field

from craft_ray.backends import ERR_ENGINE
from craft_ray.config import StrictModel


class VLLMBackendConfig(StrictModel):
    """Settings of the ``vllm`` backend (model and sampling come from the generate section)."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs per engine "
                                      "(tensor parallel).")
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64,
                                        description="Pipeline stages per engine.")
    concurrency: int | tuple[int, int] = Field(
        default=1, description="Engine replicas (data parallel); [min, max] autoscales."
    )
    batch_size: int = Field(default=64, ge=1, le=100_000,
                            description="Rows per batch sent to an engine.")
    max_num_seqs: int = Field(default=256, ge=1, le=65_536,
                              description="vLLM: sequences scheduled at once per engine.")
    max_model_len: int | None = Field(
        default=None, ge=256, le=1_048_576,
        description="vLLM context length (None: the model's). CRAFT used 16384.",
    )
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1,
                                          description="vLLM: fraction of GPU memory to use.")
    dtype: str = Field(default="auto", description="vLLM model dtype (auto, bfloat16, ...).")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse KV cache of shared prefixes (the few-shots).")
    accelerator_type: str | None = Field(
        default=None, description="Ray accelerator type to schedule engines on (e.g. H100).")
    max_concurrent_batches: int = Field(default=8, ge=1, le=1024,
                                        description="Batches in flight per engine.")
    guided_any_whitespace: bool = Field(
        default=False,
        description="Guided decoding: allow any whitespace between JSON tokens. False sets "
        "vLLM's disable_any_whitespace (engine structured_outputs_config and each request), "
        "so a model cannot loop on whitespace until max tokens.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM engine arguments (override the above).")


def processor_config(cfg: VLLMBackendConfig, model: str) -> Any:
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` for ``cfg`` (no GPU needed to build)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "max_num_seqs": cfg.max_num_seqs,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "dtype": cfg.dtype,
        "enable_prefix_caching": cfg.enable_prefix_caching,
    }
    if cfg.max_model_len is not None:
        engine_kwargs["max_model_len"] = cfg.max_model_len
    extra = dict(cfg.engine_kwargs)
    so = extra.get("structured_outputs_config")
    if not cfg.guided_any_whitespace and (so is None or isinstance(so, dict)):
        # The xgrammar backend takes this switch only from the engine config; keys the user
        # set in engine_kwargs.structured_outputs_config win.
        extra["structured_outputs_config"] = {"disable_any_whitespace": True, **(so or {})}
    engine_kwargs.update(extra)
    return vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs,
        concurrency=cfg.concurrency,
        batch_size=cfg.batch_size,
        accelerator_type=cfg.accelerator_type,
        max_concurrent_batches=cfg.max_concurrent_batches,
        # Prompts come rendered and tokenized; a failed row becomes a reject, not a crash.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
    )


def sampling_params(row: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    """vLLM sampling params (a dict, as ``ray.data.llm`` expects) for one prompt row."""
    from craft_ray.backends import row_seed

    params: dict[str, Any] = {
        "temperature": float(sampling["temperature"]),
        "top_p": float(sampling["top_p"]),
        "top_k": int(sampling["top_k"]),
        "max_tokens": int(row["max_new_tokens"]),
        "seed": row_seed(int(sampling["seed"]), str(row["sample_id"])),
    }
    if sampling["guided"]:
        # A JSON string, not a dict: a nested schema does not fit one Arrow type per column.
        params["structured_outputs"] = {
            "json": str(row["schema"]),
            "disable_any_whitespace": not sampling.get("any_whitespace", False)}
    return params


def preprocess(row: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    """Row -> the columns the vLLM stage reads (other columns are carried through)."""
    return {
        **row,
        "prompt": str(row["prompt"]),
        "tokenized_prompt": [int(t) for t in row["prompt_token_ids"]],
        "sampling_params": sampling_params(row, sampling),
    }


_ENGINE_COLUMNS = ("generated_text", "generated_tokens", "num_generated_tokens",
                   "num_input_tokens", "time_taken_llm", "__inference_error__", "metrics",
                   "request_id", "batch_uuid", "params", "prompt_logprobs", "logprobs",
                   "embeddings", "tokenized_prompt", "sampling_params")


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """Engine output -> the backend-independent generation columns."""
    err = str(row.get("__inference_error__") or "")
    tokens_out = int(row.get("num_generated_tokens") or 0)
    out = {k: v for k, v in row.items() if k not in _ENGINE_COLUMNS}
    out.update({
        "text": "" if err else str(row.get("generated_text") or ""),
        "tokens_in": int(row.get("num_input_tokens") or len(row.get("prompt_token_ids") or [])),
        "tokens_out": tokens_out,
        "gen_seconds": max(0.0, float(row.get("time_taken_llm") or 0.0)),
        # vLLM stops at max_tokens exactly; fewer tokens means the model ended the sequence.
        "finish_reason": "error" if err else (
            "length" if tokens_out >= int(row["max_new_tokens"]) else "stop"),
        "error": ERR_ENGINE if err else "",
        "error_detail": err[:2000],
    })
    return out


def vllm_generate(ds: Any, model: str, cfg: VLLMBackendConfig, sampling: dict[str, Any]
                  ) -> Any:
    """Lazy: ``ds`` (prompt rows with token ids) -> the same rows plus the generation columns."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "backend 'vllm' needs vLLM on the GPU nodes: pip install 'craft-ray[gpu]' (or "
            "pip install vllm). On CPU use backend: hf, or backend: openai against a server."
        ) from exc
    from ray.data.llm import build_processor

    sampling = {**sampling, "any_whitespace": cfg.guided_any_whitespace}
    processor = build_processor(
        processor_config(cfg, model),
        preprocess=functools.partial(preprocess, sampling=sampling),
        postprocess=postprocess,
    )
    return processor(ds)
