"""Config of the filter stage: leakage, decontamination, dedup, judge, output datasets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from craft_ray.backends.hf import HFBackendConfig
from craft_ray.backends.openai_compat import OpenAIBackendConfig
from craft_ray.backends.vllm import VLLMBackendConfig
from craft_ray.config import ConfigError, RayConfig, StrictModel
from craft_ray.stages.filter.dedup import DedupConfig
from craft_ray.tasks.fewshots import FewShotConfig

JUDGE_CRITERIA_QA = ("relevance", "coverage", "correctness")

JUDGE_CRITERIA = ("relevance", "coverage")


class FilterError(ConfigError):
    """The filter stage's input or config is unusable; the message says how to fix it."""

# --- configs -----------------------------------------------------------------------------


class LeakageConfig(StrictModel):
    """Drop samples too similar to a few-shot (CRAFT: token_set_ratio >= 85)."""

    enabled: bool = Field(default=True, description="Run the few-shot leakage filter.")
    threshold: float = Field(default=85.0, ge=0, le=100,
                             description="rapidfuzz token_set_ratio (0-100, texts lower-cased "
                             "and stripped of punctuation as thefuzz did) at or above which a "
                             "sample is dropped.")
    batch_size: int = Field(default=1024, ge=1, le=1_000_000, description="Rows per batch.")


class DecontamSetConfig(StrictModel):
    """One evaluation set (jsonl) to check the samples against."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Name in the report.")
    path: str = Field(description="jsonl file of the evaluation set.")
    text_fields: list[str] = Field(
        min_length=1,
        description="Dotted paths of the fields whose text is checked; lists are walked "
        "(e.g. ['question.stem', 'question.choices.text'] for CommonsenseQA, ['question', "
        "'options'] for MedQA; a mapping contributes its values).",
    )
    limit: int | None = Field(default=None, ge=1, description="Use only the first N items.")


class DecontaminationConfig(StrictModel):
    """n-gram overlap between samples and evaluation sets."""

    enabled: bool = Field(default=True, description="Run decontamination (needs eval_sets).")
    eval_sets: list[DecontamSetConfig] = Field(default_factory=list,
                                           description="Evaluation sets to check against.")
    ngram: int = Field(default=13, ge=1, le=64,
                       description="Words per n-gram for dropping (13 as GPT-3 / most "
                       "decontamination work).")
    report_ngrams: list[int] = Field(default_factory=lambda: [5],
                                     description="Further n reported, not dropped (CRAFT's "
                                     "5-gram figure).")
    drop: bool = Field(default=True, description="Drop samples sharing an n-gram (ngram) with "
                       "any eval item.")
    max_hits_per_row: int = Field(default=50, ge=1, le=100_000,
                                  description="Eval items recorded per sample (bounds memory; "
                                  "the eval-side % is a lower bound past it).")
    batch_size: int = Field(default=1024, ge=1, le=1_000_000, description="Rows per batch.")

    @field_validator("eval_sets")
    @classmethod
    def _unique(cls, v: list[DecontamSetConfig]) -> list[DecontamSetConfig]:
        names = [e.name for e in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"eval set names must be unique; repeated: {dup}")
        return v


class QualityJudgeConfig(StrictModel):
    """LLM-judge quality scores (1-10) through the generation backends (hf, openai, vllm)."""

    enabled: bool = Field(default=False, description="Score samples with an LLM judge.")
    backend: Literal["hf", "openai", "vllm"] | None = Field(
        default=None, description="Backend of the judge; default: the generate stage's.")
    model: str | None = Field(default=None, description="Judge model (id or path; served "
                              "name for openai); default: the generate stage's generator.")
    tokenizer: str | None = Field(default=None, description="Tokenizer whose chat template "
                                  "renders the judge prompt; default: the model (hf, vllm).")
    max_new_tokens: int = Field(default=64, ge=8, le=4096,
                                description="Tokens of the judge's reply (a small JSON).")
    guided_decoding: bool = Field(default=True, description="Constrain the reply to the scores' "
                                  "JSON schema (integers 1-10, compact JSON unless the "
                                  "backend's guided_any_whitespace is set).")
    temperature: float = Field(default=0.0, ge=0, le=2,
                               description="Judge sampling temperature (0: greedy, the usual "
                               "choice; > 0 samples the scores, seeded per row).")
    seed: int = Field(default=0, ge=0, le=2**31 - 1,
                      description="Seed of the judge's sampling (temperature > 0).")
    hf: HFBackendConfig | None = Field(default=None, description="hf backend settings "
                                       "(default: the generate stage's).")
    openai: OpenAIBackendConfig | None = Field(default=None, description="openai backend "
                                               "settings (default: the generate stage's).")
    vllm: VLLMBackendConfig | None = Field(default=None, description="vllm backend settings "
                                           "(default: the generate stage's).")
    min_scores: dict[str, int] = Field(
        default_factory=lambda: {"relevance": 6, "coverage": 6, "correctness": 6},
        description="Drop a sample scoring below this on a criterion (1-10). correctness is "
        "scored only for multiple-choice tasks.")
    max_doc_chars: int = Field(default=6000, ge=100, le=1_000_000,
                               description="Source document characters shown to the judge.")
    doc_texts: str | None = Field(
        default=None, description="Parquet/JSONL with doc_id, text of the source documents "
        "(default: the generate stage's input, else RUN_DIR/retrieve/corpus_samples.parquet). "
        "Loaded once per prompt-building actor.")
    prompt_concurrency: int = Field(default=1, ge=1, le=1024,
                                    description="Judge prompt-building actors.")

    @field_validator("min_scores")
    @classmethod
    def _scores(cls, v: dict[str, int]) -> dict[str, int]:
        bad = sorted(set(v) - set(JUDGE_CRITERIA_QA))
        if bad:
            raise ValueError(f"unknown judge criteria {bad}; known: {list(JUDGE_CRITERIA_QA)}")
        if any(not 1 <= s <= 10 for s in v.values()):
            raise ValueError("judge min_scores must be between 1 and 10")
        return v


class DatasetsConfig(StrictModel):
    """The final sized datasets."""

    sizes: dict[str, int] = Field(
        default_factory=lambda: {"S": 100, "M": 500, "L": 5000, "XL": 25000},
        description="Name -> total samples (few-shots included, as CRAFT).")
    seed: int = Field(default=0, ge=0, le=2**31, description="Seed of the sample choice.")
    include_fewshots: bool = Field(default=True, description="Add the few-shots with "
                                   "is_few_shot=1 (they count towards each size).")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("give at least one dataset size")
        for name, n in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"size name {name!r}: use letters, digits, '_', '-', '.'")
            if n < 1:
                raise ValueError(f"size {name}={n}: must be >= 1")
        return v


class FilterConfig(StrictModel):
    """Config of ``craft-ray filter``."""

    input: str | None = Field(default=None, description="Clean samples (Parquet file or "
                              "folder); default RUN_DIR/generate/clean.parquet.")
    task: str | dict[str, Any] | None = Field(
        default=None, description="Task name or custom task config; default: the generate "
        "stage's (RUN_DIR/generate/config.yaml), else the input's task column.")
    fewshots: FewShotConfig | None = Field(
        default=None, description="The few-shots; default: the generate stage's.")
    leakage: LeakageConfig = Field(default_factory=LeakageConfig,
                                   description="Few-shot leakage filter.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Dedup steps.")
    decontamination: DecontaminationConfig = Field(
        default_factory=DecontaminationConfig, description="Eval-set n-gram overlap.")
    judge: QualityJudgeConfig = Field(default_factory=QualityJudgeConfig, description="LLM judge.")
    datasets: DatasetsConfig = Field(default_factory=DatasetsConfig,
                                     description="Final sized datasets.")


class FilterStageConfig(StrictModel):
    """A YAML file for ``craft-ray filter``: common keys plus the ``filter`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Filter stage.")

# --- input resolution ---------------------------------------------------------------------


def read_stage_config(run_dir: str | Path, stage: str) -> dict[str, Any]:
    from craft_ray.runtime import storage

    p = storage.join(run_dir, stage, "config.yaml")
    if not storage.is_file(p):
        return {}
    try:
        data = yaml.safe_load(storage.read_text(p)) or {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
