"""Config of the evaluate stage."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from craft_ray.config import RayConfig, StrictModel
from craft_ray.evalsets.base import EvalSetConfig
from craft_ray.judging import JUDGE_TEMPLATE, JudgeModelConfig

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

# --- config ----------------------------------------------------------------------------------


class ModelSpec(StrictModel):
    """One model to evaluate: a base (or merged) checkpoint, optionally with a PEFT adapter."""

    name: str = Field(description="Name in outputs (folder name: letters, digits, _ . -).",
                      min_length=1, max_length=120)
    model: str = Field(description="Base or merged model: local path or hub id.", min_length=1)
    adapter: str | None = Field(
        default=None, description="PEFT adapter folder (RUN_DIR/train/TRIAL/adapter): a "
        "path or an s3:// / gs:// URI; '{run_dir}' stands for the run directory, e.g. "
        "'{run_dir}/train/S-seed1234/adapter'."
    )
    merge_adapter: bool = Field(
        default=False,
        description="hf backend: merge the adapter into the weights after loading (faster "
        "forward passes, same scores up to rounding).",
    )
    group: str | None = Field(
        default=None,
        description="Series in sweep tables and plots (e.g. base, fewshot, craft); default: "
        "'base' without an adapter, else 'adapter'.",
    )
    size: str | None = Field(
        default=None, description="Training-set size label (S, M, L, XL or a number) for plots."
    )
    seed: int | None = Field(default=None, description="Training seed (repeats are averaged).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must match [A-Za-z0-9][A-Za-z0-9_.-]* (it is a folder name)")
        return v

    @property
    def series(self) -> str:
        return self.group or ("adapter" if self.adapter else "base")


class VLLMScoreConfig(StrictModel):
    """vLLM engine settings of ``backend: vllm``."""

    top_logprobs: int = Field(
        default=20, ge=1, le=1000,
        description="Logprobs returned for the one generated token; letters outside them "
        "count as -inf (CRAFT's setting).",
    )
    max_model_len: int | None = Field(default=None, ge=16, description="vLLM max_model_len.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs per engine.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1,
                                          description="vLLM gpu_memory_utilization.")
    max_lora_rank: int = Field(default=64, ge=1, le=1024,
                               description="Largest LoRA rank served (adapters as LoRA).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra vllm engine arguments (override the above)."
    )


class GenerationConfig(StrictModel):
    """How generative sets are answered by the evaluated model (greedy by default)."""

    max_new_tokens: int | None = Field(
        default=None, ge=1, le=65_536,
        description="Answer budget (default: the task's CRAFT budget: summarization 1536, "
        "recipegen 1280).")
    temperature: float = Field(
        default=0.0, ge=0, le=5,
        description="0: greedy (reproducible). CRAFT's run_eval.py sampled at 0.7 / top_p "
        "0.9 / top_k 40.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling (temperature > 0).")
    top_k: int = Field(default=-1, ge=-1, le=100_000,
                       description="Top-k sampling (temperature > 0; -1: off).")
    seed: int = Field(default=0, ge=0, le=2**31 - 1,
                      description="Sampling seed per item (temperature > 0).")
    generate_batch_size: int = Field(default=4, ge=1, le=1024,
                                     description="hf: prompts per generate() call (left-padded).")


class SweepModelsConfig(StrictModel):
    """Evaluate every finished trial of a sweep: its adapters are found in the sweep output."""

    path: str | None = Field(
        default=None, description="The sweep folder (default RUN_DIR/sweep; it holds "
        "results.jsonl, one row per trial, written by `craft-ray sweep`).")
    base_model: str | None = Field(
        default=None, description="Base model of the adapters (default: train.base_model "
        "in the sweep's config.yaml).")
    group: str = Field(default="craft", min_length=1,
                       description="Series name of the trials in tables and plots.")
    sizes: list[str] | None = Field(default=None,
                                    description="Only trials of these sizes (default: all).")
    merge_adapter: bool = Field(default=False,
                                description="As ModelSpec.merge_adapter, for every trial.")


class EvaluateConfig(StrictModel):
    """Config of ``craft-ray evaluate``."""

    task: str | None = Field(
        default=None,
        description="Task whose Task.training_pair formats the prompt (bioqa, medqa, csqa or "
        "a custom multiple-choice task). Empty: CRAFT's evaluation format "
        "'question\\nA. ...\\nB. ...'.",
    )
    models: list[ModelSpec] = Field(
        default_factory=list,
        description="Models to evaluate (with or instead of the trials found by `sweep`).")
    sweep: SweepModelsConfig | None = Field(
        default=None, description="Also evaluate every finished trial of a sweep.")
    sets: list[EvalSetConfig] = Field(
        min_length=1, description="Evaluation sets: multiple-choice (accuracy) and generative "
        "(ROUGE-L, plus the judge's win rate when `judge` is set).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig,
                                         description="Generative sets: decoding settings.")
    judge: JudgeModelConfig | None = Field(
        default=None, description="Generative sets: the LLM judge comparing each output with "
        "the reference (win rate); none: ROUGE-L only.")
    judge_seed: int = Field(default=1234, ge=0, le=2**31 - 1,
                            description="Seed of the judge's random order swap (CRAFT: 1234).")
    judge_template: str = Field(
        default=JUDGE_TEMPLATE, min_length=1,
        description="Judge prompt with {instruction}, {output_1}, {output_2}.")
    backend: Literal["hf", "vllm"] = Field(
        default="hf", description="hf: logits from transformers; vllm: ray.data.llm logprobs."
    )
    template: Literal["auto", "chat", "plain"] = Field(
        default="auto",
        description="As train.template (must match it): chat: the tokenizer's chat template "
        "(optional system turn, user turn, generation prompt); plain: plain_template with BOS; "
        "auto: chat when the tokenizer has a template.",
    )
    plain_template: str = Field(default="{prompt}\n",
                                description="As train.plain_template (plain prompts).")
    system_prompt: str | None = Field(default=None,
                                      description="As train.system_prompt (chat prompts).")
    letter_prefixes: list[str] = Field(
        default_factory=lambda: ["", " "],
        description="Surface forms of a letter token: prefix + letter (e.g. 'A' and ' A'); "
        "a letter's score is its best single-token form. [''] is CRAFT's exact setting.",
        min_length=1,
    )
    batch_size: int = Field(default=32, ge=1, le=100_000,
                            description="Items per Ray Data batch handed to an actor.")
    forward_batch_size: int = Field(default=8, ge=1, le=4096,
                                    description="hf: prompts per forward pass.")
    max_prompt_tokens: int = Field(
        default=4096, ge=8, le=1_000_000,
        description="Longer prompts are cut from the left (the answer position stays); "
        "counted in results as 'truncated'.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="hf weights dtype (auto: bfloat16 on GPU, float32 on CPU)."
    )
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per scoring actor/engine.")
    num_cpus: float | None = Field(
        default=None, gt=0,
        description="CPUs per scoring actor (default: an equal share of the cluster's CPUs "
        "minus 1 left to the stage's own tasks, lowered until the pool fits the nodes; 1 with "
        "a GPU). A pool that cannot fit fails before work starts.")
    torch_threads: int | None = Field(default=None, ge=1,
                                      description="hf: torch threads per actor (default num_cpus).")
    concurrency: int = Field(default=1, ge=1, le=4096,
                             description="Scoring actors (hf) or vLLM engines per model.")
    vllm: VLLMScoreConfig = Field(default_factory=VLLMScoreConfig,
                                  description="vLLM settings (backend: vllm).")
    ci_level: float = Field(default=0.95, gt=0, lt=1, description="Confidence level of the CI.")
    plot: bool = Field(default=True, description="Write accuracy.png and report.md.")
    output_dir: str | None = Field(default=None,
                                   description="Where outputs go (default RUN_DIR/evaluate).")

    @model_validator(mode="after")
    def _unique(self) -> EvaluateConfig:
        if not self.models and self.sweep is None:
            raise ValueError("nothing to evaluate: list `models` and/or set `sweep` (every "
                             "finished trial of a sweep)")
        for key in ("{instruction}", "{output_1}", "{output_2}"):
            if key not in self.judge_template:
                raise ValueError(f"judge_template must contain {key}")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}")
        sets = [s.display_name for s in self.sets]
        dup = sorted({n for n in sets if sets.count(n) > 1})
        if dup:
            raise ValueError(f"eval set names must be unique (set `label`); repeated: {dup}")
        for p in self.letter_prefixes:
            if len(p) > 4:
                raise ValueError(f"letter prefix {p!r} is too long (use '', ' ', '\\n')")
        if "{prompt}" not in self.plain_template:
            raise ValueError("plain_template must contain '{prompt}'")
        return self


class EvaluateStageConfig(StrictModel):
    """A YAML file for ``craft-ray evaluate``: common keys plus the ``evaluate`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    evaluate: EvaluateConfig

    @model_validator(mode="before")
    @classmethod
    def _run_dir_in_adapters(cls, data: Any) -> Any:
        """``{run_dir}`` in an adapter is this run's directory, so one config serves a local
        run and one in a bucket (``--set run_dir=s3://...``)."""
        if not isinstance(data, dict) or not isinstance(data.get("evaluate"), dict):
            return data
        run_dir = str(data.get("run_dir") or cls.model_fields["run_dir"].default).rstrip("/")
        models = data["evaluate"].get("models")
        if isinstance(models, list):
            models = [{**m, "adapter": m["adapter"].replace("{run_dir}", run_dir)}
                      if isinstance(m, dict) and isinstance(m.get("adapter"), str) else m
                      for m in models]
            data = {**data, "evaluate": {**data["evaluate"], "models": models}}
        return data
