"""Filter stage: clean generated samples -> filtered samples -> sized datasets (S, M, L, XL).

The steps, in order (cheap before expensive; each sees only the previous step's survivors)::

    exact_dedup       normalised-text hash, keep the smallest sample_id      (one shuffle)
    fewshot_leakage   rapidfuzz token_set_ratio vs every few-shot >= 85      (map_batches)
    decontamination   n-gram overlap with evaluation sets (report; drop)     (map_batches)
    fuzzy_dedup       MinHash-LSH components, keep the smallest sample_id    (one shuffle)
    semantic_dedup    embedding cosine >= threshold inside k-means clusters  (actors + shuffle)
    judge             LLM-judge scores 1-10, threshold per criterion         (optional)

Each step's survivors feed the next: rows are marked in place (``reject_step``,
``reject_reason``, ``reject_detail``) and a step only looks at rows no earlier step rejected, so
the plan stays lazy between the global (shuffle) steps. Every step's drops are counted per
reason in ``stats.json`` (``steps``) and written, with the full row, to ``rejects/``; the
judge's (with their scores) to ``judge_rejects/``.

The survivors then give the final datasets, chosen by a seeded hash priority
(``blake2b(seed:sample_id)``): a size takes the lowest-priority generated samples, so the
sizes are nested (S ⊂ M ⊂ L ⊂ XL) and the choice does not depend on block order or on which
other samples survived. Each size holds every few-shot (``is_few_shot=1``) and
``size - #few-shots`` generated samples, as CRAFT built its datasets.

Outputs::

    RUN_DIR/filter/
      config.yaml  stats.json  _SUCCESS
      decontamination.json            overlap % per eval set (13-gram and 5-gram by default)
      rejects/*.parquet               dropped rows with reject_step/reason/detail
      judge_rejects/*.parquet         rows the judge dropped, with judge_* scores
      survivors/*.parquet             every sample that passed all filters
      datasets/{S,M,L,XL}/hf/         datasets.save_to_disk (load_from_disk works)
                          data.parquet data.jsonl README.md
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, field_validator

from craft_ray.backends.hf import HFBackendConfig
from craft_ray.backends.openai_compat import OpenAIBackendConfig
from craft_ray.backends.vllm import VLLMBackendConfig
from craft_ray.config import ConfigError, RayConfig, StrictModel
from craft_ray.dedup import (
    DedupConfig,
    _shingles_batch,
    exact_duplicates_dataset,
    fuzzy_duplicates_dataset,
    semantic_duplicates_dataset,
)
from craft_ray.fewshots import FewShotConfig, load_fewshots
from craft_ray.runtime import StageDir, StageStats, atomic_write_json

logger = logging.getLogger(__name__)

REJECT_COLUMNS = ("reject_step", "reject_reason", "reject_detail")
PROVENANCE_COLUMNS = ("sample_id", "task", "doc_id", "corpus", "fewshot_ids")
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


class EvalSetConfig(StrictModel):
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
    eval_sets: list[EvalSetConfig] = Field(default_factory=list,
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
    def _unique(cls, v: list[EvalSetConfig]) -> list[EvalSetConfig]:
        names = [e.name for e in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"eval set names must be unique; repeated: {dup}")
        return v


class JudgeConfig(StrictModel):
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
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="LLM judge.")
    datasets: DatasetsConfig = Field(default_factory=DatasetsConfig,
                                     description="Final sized datasets.")


class FilterStageConfig(StrictModel):
    """A YAML file for ``craft-ray filter``: common keys plus the ``filter`` section."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Filter stage.")


# --- few-shot leakage (plain functions) ---------------------------------------------------


def leakage_scores(texts: Sequence[str], fewshot_texts: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Best token_set_ratio of each text against the few-shots and the few-shot's index.

    Texts are processed as thefuzz did (lower case, non-alphanumerics removed), which CRAFT
    relied on; rapidfuzz's default is no processing.
    """
    from rapidfuzz import fuzz, process, utils

    if not len(texts) or not len(fewshot_texts):
        return np.zeros(len(texts)), np.full(len(texts), -1)
    scores = process.cdist(list(texts), list(fewshot_texts), scorer=fuzz.token_set_ratio,
                           processor=utils.default_process, dtype=np.float32, workers=1)
    best = scores.argmax(axis=1)
    return scores[np.arange(len(texts)), best].astype(np.float64), best


def leakage_batch(table: Any, fewshot_texts: list[str], fewshot_ids: list[str],
                  threshold: float) -> Any:
    """Ray Data UDF (pyarrow): mark rows whose best few-shot ratio >= threshold."""
    open_ = _open_rows(table)
    texts = [str(t) for t, o in zip(table.column("sample_text").to_pylist(), open_) if o]
    score, best = leakage_scores(texts, fewshot_texts)
    it = iter(zip(score, best))
    reasons, details = [], []
    for o in open_:
        s, b = next(it) if o else (0.0, -1)
        hit = b >= 0 and s >= threshold
        reasons.append("fewshot_leakage" if hit else None)
        details.append(f"token_set_ratio {s:.1f} with few-shot {fewshot_ids[b]}" if hit
                       else None)
    return _with_reasons(table, "fewshot_leakage", reasons, details)


# --- decontamination (plain functions) ----------------------------------------------------


def _walk(value: Any, path: list[str]) -> list[str]:
    if isinstance(value, list):
        return [s for v in value for s in _walk(v, path)]
    if not path:
        if isinstance(value, str):
            return [value]
        if isinstance(value, Mapping):
            return [s for v in value.values() for s in _walk(v, [])]
        return [] if value is None else [str(value)]
    if isinstance(value, Mapping) and path[0] in value:
        return _walk(value[path[0]], path[1:])
    return []


def eval_item_text(record: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The text of one eval item: the strings at the dotted paths, joined by newlines."""
    return "\n".join(s for f in fields for s in _walk(record, f.split(".")))


def load_eval_set(cfg: EvalSetConfig, base_dir: str | Path | None = None) -> list[str]:
    """Texts of an evaluation set; a missing file or fields that give no text is an error."""
    from craft_ray.fewshots import read_json_lines

    texts: list[str] = []
    for _i, rec in read_json_lines(cfg.path, base_dir, FilterError,
                                   f"eval set {cfg.name}: file"):
        texts.append(eval_item_text(rec, cfg.text_fields))
        if cfg.limit and len(texts) >= cfg.limit:
            break
    if not texts or not any(t.strip() for t in texts):
        raise FilterError(f"eval set {cfg.name}: no text at fields {cfg.text_fields} in "
                          f"{cfg.path}; "
                          "set text_fields to dotted paths of the items' text fields")
    return texts


class NgramIndex:
    """Sorted n-gram hashes of an eval set with the item each came from (for membership)."""

    def __init__(self, texts: Sequence[str], n: int) -> None:
        hashes, counts = _shingles_batch(list(texts), n)
        items = np.repeat(np.arange(len(texts)), counts)
        # Texts shorter than n words give one whole-text shingle; drop those, they are not
        # n-grams and would only match an identical short sample.
        long_enough = np.repeat(np.array([len(t.split()) >= n for t in texts]), counts)
        hashes, items = hashes[long_enough], items[long_enough]
        order = np.lexsort((items, hashes))
        self.hashes = hashes[order]
        self.items = items[order]
        self.n = n
        self.num_items = len(texts)

    def hits(self, texts: Sequence[str], max_items: int) -> list[list[int]]:
        """For each text, the eval items (sorted, at most ``max_items``) sharing an n-gram."""
        if not len(texts):
            return []
        hashes, counts = _shingles_batch(list(texts), self.n)
        out: list[list[int]] = []
        pos = 0
        for t, c in zip(texts, counts):
            h = hashes[pos:pos + c]
            pos += c
            if len(t.split()) < self.n or not len(self.hashes):
                out.append([])
                continue
            lo = np.searchsorted(self.hashes, h, side="left")
            hi = np.searchsorted(self.hashes, h, side="right")
            found = [self.items[a:b] for a, b in zip(lo, hi) if b > a]
            if not found:
                out.append([])
                continue
            out.append(np.unique(np.concatenate(found))[:max_items].tolist())
        return out


def overlap_summary(hit_lists: Sequence[Sequence[int]], num_items: int) -> dict[str, Any]:
    """Samples with any overlap and eval items touched, as counts and percentages."""
    n = len(hit_lists)
    samples = sum(1 for h in hit_lists if len(h))
    touched = len({i for h in hit_lists for i in h})
    return {"samples": n, "samples_overlapping": samples,
            "samples_overlapping_pct": round(100.0 * samples / n, 3) if n else 0.0,
            "eval_items": num_items, "eval_items_overlapping": touched,
            "eval_items_overlapping_pct": round(100.0 * touched / num_items, 3)
            if num_items else 0.0}


def decontam_batch(table: Any, indexes: Any, drop_n: int, drop: bool,
                   max_hits: int) -> Any:
    """Ray Data UDF (pyarrow): per eval set and n, the eval items sharing an n-gram.

    Adds ``_decontam`` (JSON: ``{"set:n": [items...]}``) and marks rows overlapping any set
    at ``drop_n`` when ``drop``.
    """
    import ray

    idx = ray.get(indexes) if isinstance(indexes, ray.ObjectRef) else indexes
    open_ = _open_rows(table)
    texts = [str(t) for t, o in zip(table.column("sample_text").to_pylist(), open_) if o]
    per_row: list[dict[str, list[int]]] = [{} for _ in texts]
    for (name, n), index in idx.items():
        for row, h in zip(per_row, index.hits(texts, max_hits)):
            if h:
                row[f"{name}:{n}"] = h
    it = iter(per_row)
    rows: list[dict[str, list[int]] | None] = [next(it) if o else None for o in open_]
    reasons, details = [], []
    for row in rows:
        if row is None:
            reasons.append(None)
            details.append(None)
            continue
        sets = sorted(k.split(":")[0] for k in row if int(k.split(":")[1]) == drop_n)
        hit = drop and bool(sets)
        reasons.append("eval_contamination" if hit else None)
        details.append(f"{drop_n}-gram overlap with {', '.join(sets)}" if hit else None)
    import pyarrow as pa

    table = table.append_column("_decontam", pa.array(
        [None if r is None else json.dumps(r) for r in rows], pa.string()))
    return _with_reasons(table, "decontamination", reasons, details)


# --- LLM judge (plain functions) -----------------------------------------------------------


JUDGE_TEMPLATE = """\
You are a strict reviewer of training data for the task "{task}". Read the source document \
and the task sample generated from it, then rate the sample.

Source document:
<<<
{document}
>>>

Task sample:
<<<
{sample}
>>>

Rate each criterion from 1 (very poor) to 10 (excellent):
{criteria}
Return only a JSON object with integer scores, like {example}."""

_CRITERIA_TEXT = {
    "relevance": "- relevance: the sample is about the content of the source document.",
    "coverage": "- coverage: the sample can be answered or completed from the document alone.",
    "correctness": "- correctness: the answer marked as correct is actually correct and the "
                   "other options are wrong.",
}


def judge_criteria(is_multiple_choice: bool) -> tuple[str, ...]:
    """Criteria scored for a task: correctness only for multiple-choice QA."""
    return JUDGE_CRITERIA_QA if is_multiple_choice else JUDGE_CRITERIA


def judge_prompt(task_name: str, sample_text: str, document: str, is_multiple_choice: bool,
                 max_doc_chars: int = 6000) -> str:
    """The judge prompt for one sample and its source document (document cut to a budget)."""
    crit = judge_criteria(is_multiple_choice)
    doc = document if len(document) <= max_doc_chars else document[:max_doc_chars] + " [...]"
    example = json.dumps({c: 7 for c in crit})
    return JUDGE_TEMPLATE.format(task=task_name, document=doc.strip(), sample=sample_text.strip(),
                                 criteria="\n".join(_CRITERIA_TEXT[c] for c in crit),
                                 example=example)


_SCORE_LINE = re.compile(r"\b(relevance|coverage|correctness)\b\W{0,5}(\d{1,2})\b", re.I)


def parse_judge_scores(text: str, criteria: Sequence[str]) -> dict[str, int] | None:
    """Scores 1-10 per criterion from a judge reply (a JSON object, else ``name: N`` lines).

    ``None`` when any criterion is missing or out of range (the row is rejected as
    ``judge_unparseable``).
    """
    from craft_ray.tasks import iter_json_objects

    found: dict[str, int] = {}
    for obj in iter_json_objects(text or ""):
        cand = {str(k).lower(): v for k, v in obj.items()}
        if all(c in cand for c in criteria):
            try:
                found = {c: int(round(float(cand[c]))) for c in criteria}
            except (TypeError, ValueError):
                continue
            break
    if not found:
        for name, val in _SCORE_LINE.findall(text or ""):
            found.setdefault(name.lower(), int(val))
    if any(c not in found or not 1 <= found[c] <= 10 for c in criteria):
        return None
    return {c: found[c] for c in criteria}


def judge_reason(scores: dict[str, int] | None, min_scores: Mapping[str, int]
                 ) -> tuple[str | None, str | None]:
    """(reason, detail) of a judged sample; ``(None, None)`` when it passes."""
    if scores is None:
        return "judge_unparseable", "no 1-10 score for every criterion in the judge's reply"
    low = [f"{c}={s}<{min_scores[c]}" for c, s in scores.items()
           if c in min_scores and s < min_scores[c]]
    if low:
        return "judge_low_score", ", ".join(low)
    return None, None


# --- batch helpers ------------------------------------------------------------------------


def _with_reasons(table: Any, step: str, reasons: list[str | None],
                  details: list[str | None]) -> Any:
    """Set the reject columns of the rows this step rejects; earlier rejections stay."""
    import pyarrow as pa

    prev = {c: table.column(c).to_pylist() if c in table.column_names
            else [None] * table.num_rows for c in REJECT_COLUMNS}
    new = {"reject_step": [step if r else None for r in reasons],
           "reject_reason": reasons, "reject_detail": details}
    for name in REJECT_COLUMNS:
        vals = [p if prev["reject_reason"][i] is not None else v
                for i, (p, v) in enumerate(zip(prev[name], new[name]))]
        col = pa.array(vals, pa.string())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, col)
        else:
            table = table.append_column(name, col)
    return table


def _open_rows(table: Any) -> list[bool]:
    """Which rows no earlier step rejected."""
    if "reject_reason" not in table.column_names:
        return [True] * table.num_rows
    return [r is None for r in table.column("reject_reason").to_pylist()]


def mark_drops_batch(table: Any, drops: Any, step: str, reason: str) -> Any:
    """Ray Data UDF (pyarrow): mark rows whose sample_id is a key of ``drops`` (dup -> kept)."""
    import ray

    d = ray.get(drops) if isinstance(drops, ray.ObjectRef) else drops
    ids = [str(x) for x in table.column("sample_id").to_pylist()]
    reasons = [reason if i in d else None for i in ids]
    details = [f"duplicate of {d[i]}" if i in d else None for i in ids]
    return _with_reasons(table, step, reasons, details)


def priority_batch(table: Any, seed: int) -> Any:
    """Ray Data UDF (pyarrow): ``_priority`` = uint64 of blake2b(seed:sample_id)."""
    import pyarrow as pa

    pri = [int.from_bytes(hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(),
                          "big") >> 1 for s in table.column("sample_id").to_pylist()]
    return table.append_column("_priority", pa.array(pri, pa.int64()))


# --- input resolution ---------------------------------------------------------------------


def _stage_config(run_dir: Path, stage: str) -> dict[str, Any]:
    p = run_dir / stage / "config.yaml"
    if not p.is_file():
        return {}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def resolve_input(cfg: FilterConfig, run_dir: str | Path) -> Path:
    """The clean-samples path; a missing one is a :class:`FilterError` naming the fix."""
    p = Path(cfg.input) if cfg.input else Path(run_dir) / "generate" / "clean.parquet"
    if not p.exists():
        raise FilterError(f"clean samples {p} do not exist: run `craft-ray generate` first or "
                          "set filter.input to a Parquet file/folder of clean samples")
    return p


def resolve_task(cfg: FilterConfig, run_dir: str | Path, input_path: Path) -> Any:
    """The task from the config, else the generate stage's config, else the task column."""
    from craft_ray.tasks import get_task

    spec: Any = cfg.task
    if spec is None:
        spec = _stage_config(Path(run_dir), "generate").get("task")
    if spec is None:
        import pyarrow.parquet as pq

        names = set(pq.ParquetDataset(str(input_path)).read(columns=["task"])
                    .column("task").to_pylist()) if "task" in _input_columns(input_path) \
            else set()
        if len(names) == 1:
            spec = names.pop()
    if spec is None:
        raise FilterError("cannot tell the task: set filter.task (a built-in name or a custom "
                          "task config)")
    return get_task(spec)


def resolve_fewshots(cfg: FilterConfig, run_dir: str | Path) -> FewShotConfig | None:
    """The few-shot config from the filter section, else the generate stage's."""
    if cfg.fewshots is not None:
        return cfg.fewshots
    gen = _stage_config(Path(run_dir), "generate")
    raw = gen.get("fewshots")
    if isinstance(raw, dict):
        return FewShotConfig.model_validate(raw)
    return None


def _input_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.ParquetDataset(str(path)).schema.names)


def check_input_columns(path: Path, record_fields: Sequence[str]) -> list[str]:
    """The input's columns; missing required ones are a :class:`FilterError`."""
    cols = _input_columns(path)
    need = ["sample_id", "sample_text", *record_fields]
    missing = [c for c in need if c not in cols]
    if missing:
        raise FilterError(f"{path} lacks column(s) {missing} (has {cols}); the filter stage "
                          "reads generate's clean samples: the task's record fields plus "
                          "sample_id and sample_text")
    return cols


# --- the stage ----------------------------------------------------------------------------


def init_rejects_batch(table: Any) -> Any:
    """Ray Data UDF (pyarrow): add empty ``reject_step/reason/detail`` columns."""
    n = table.num_rows
    return _with_reasons(table, "", [None] * n, [None] * n)


def _keep_rows(table: Any, rejected: bool) -> Any:
    import pyarrow.compute as pc

    mask = pc.is_valid(table.column("reject_reason"))
    return table.filter(mask if rejected else pc.invert(mask))


def survivors_of(ds: Any) -> Any:
    """Rows no step has rejected (lazy)."""
    return ds.map_batches(_keep_rows, batch_format="pyarrow", fn_kwargs={"rejected": False})


def rejected_of(ds: Any) -> Any:
    """Rows some step rejected (lazy)."""
    return ds.map_batches(_keep_rows, batch_format="pyarrow", fn_kwargs={"rejected": True})


def _mark_dedup(ds: Any, find: Callable[[Any], dict[str, str]], step: str, reason: str) -> Any:
    import ray

    drops = find(survivors_of(ds))
    return ds.map_batches(mark_drops_batch, batch_format="pyarrow",
                          fn_kwargs={"drops": ray.put(drops), "step": step, "reason": reason})


def step_counts(ds: Any, rows_in: int, order: Sequence[str]) -> list[dict[str, Any]]:
    """Per step: rows in, rows out, dropped and reasons, from the marked dataset."""
    per: dict[str, Counter[str]] = {s: Counter() for s in order}
    for b in ds.select_columns(["reject_step", "reject_reason"]).iter_batches(
            batch_format="pyarrow", batch_size=65_536):
        for st, rs in zip(b.column("reject_step").to_pylist(),
                          b.column("reject_reason").to_pylist()):
            if st is not None:
                per.setdefault(st, Counter())[rs] += 1
    out, n = [], rows_in
    for st in order:
        dropped = sum(per[st].values())
        out.append({"step": st, "rows_in": n, "rows_out": n - dropped, "dropped": dropped,
                    "reasons": dict(per[st])})
        n -= dropped
    return out


def run_filter(stage_cfg: FilterStageConfig, *, force: bool = False) -> dict[str, Any]:
    """Run the filter stage (Ray must be initialised); returns the stage's stats.

    Everything that can be checked (input columns, task, few-shots, eval sets, sizes against
    the number of few-shots) is checked before any work starts. Rows are marked in place by
    each step (``reject_step`` etc.); a step only looks at rows no earlier step rejected.
    """
    import ray.data

    cfg = stage_cfg.filter
    run_dir = Path(stage_cfg.run_dir)
    stage = StageDir(run_dir, "filter")
    if not force and stage.is_complete(cfg):
        logger.info("filter: already complete in %s (same config); skipping", stage.path)
        return json.loads((stage.path / "stats.json").read_text())

    # --- checks before work ---
    from craft_ray.fewshots import FewShotError
    from craft_ray.tasks import TaskError

    input_path = resolve_input(cfg, run_dir)
    try:
        task = resolve_task(cfg, run_dir, input_path)
    except TaskError as exc:
        raise FilterError(f"filter.task: {exc}") from None
    cols = check_input_columns(input_path, task.record_fields)
    fs_cfg = resolve_fewshots(cfg, run_dir)
    if fs_cfg is None and (cfg.leakage.enabled or cfg.datasets.include_fewshots):
        raise FilterError("no few-shots configured: set filter.fewshots (path, fields) — the "
                          "leakage filter and the datasets need them — or disable "
                          "filter.leakage.enabled and filter.datasets.include_fewshots")
    try:
        shots = load_fewshots(fs_cfg) if fs_cfg is not None else []
    except FewShotError as exc:
        raise FilterError(f"filter.fewshots: {exc}") from None
    fs_records = [task.fewshot_record(s) for s in shots]
    fs_texts = [task.sample_text(r) for r in fs_records]
    n_fs = len(shots) if cfg.datasets.include_fewshots else 0
    too_small = {k: v for k, v in cfg.datasets.sizes.items() if v < n_fs}
    if too_small:
        raise FilterError(f"dataset sizes {too_small} are smaller than the {n_fs} few-shots "
                          "they must include; raise them or set "
                          "filter.datasets.include_fewshots=false")
    eval_texts: dict[str, list[str]] = {}
    if cfg.decontamination.enabled:
        eval_texts = {e.name: load_eval_set(e) for e in cfg.decontamination.eval_sets}
        if not eval_texts:
            logger.warning("filter: decontamination enabled but no eval_sets configured; "
                           "skipping it")
    if cfg.judge.enabled:
        resolve_judge(cfg.judge, run_dir)

    stage.begin(cfg, clean=True)
    stats = StageStats("filter")
    ds = ray.data.read_parquet(str(input_path)).map_batches(
        init_rejects_batch, batch_format="pyarrow").materialize()
    stats.rows_in = ds.count()
    logger.info("filter: %d clean samples of task %s from %s", stats.rows_in, task.name,
                input_path)

    d = cfg.dedup
    order: list[str] = []
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[Any], Any], x: Any, materialize: bool = True) -> Any:
        t0 = time.time()
        out = fn(x)
        out = out.materialize() if materialize else out
        seconds[name] = round(time.time() - t0, 3)
        order.append(name)
        logger.info("filter/%s: done in %.1fs", name, seconds[name])
        return out

    if d.exact.enabled:
        ds = timed("exact_dedup", lambda x: _mark_dedup(
            x, lambda y: exact_duplicates_dataset(y, d.shuffle_partitions),
            "exact_dedup", "exact_duplicate"), ds, materialize=False)
    if cfg.leakage.enabled and fs_texts:
        ds = timed("fewshot_leakage", lambda x: x.map_batches(
            leakage_batch, batch_size=cfg.leakage.batch_size, batch_format="pyarrow",
            fn_kwargs={"fewshot_texts": fs_texts, "fewshot_ids": [s.id for s in shots],
                       "threshold": cfg.leakage.threshold}), ds, materialize=False)
    decontam_report: dict[str, Any] = {"enabled": bool(eval_texts)}
    if eval_texts:
        ds = timed("decontamination", lambda x: _decontam_step(
            x, cfg.decontamination, eval_texts, decontam_report), ds, materialize=False)
    else:
        ds = ds.materialize()
    if d.fuzzy.enabled:
        ds = timed("fuzzy_dedup", lambda x: _mark_dedup(
            x, lambda y: fuzzy_duplicates_dataset(y, d.fuzzy, d.shuffle_partitions),
            "fuzzy_dedup", "near_duplicate"), ds, materialize=False)
    if d.semantic.enabled:
        ds = timed("semantic_dedup", lambda x: _mark_dedup(
            x, lambda y: semantic_duplicates_dataset(y, d.semantic, d.shuffle_partitions),
            "semantic_dedup", "semantic_duplicate"), ds, materialize=False)
    if "_decontam" in ds.columns():
        ds = ds.drop_columns(["_decontam"])
    ds = ds.materialize()

    steps = step_counts(ds, stats.rows_in, order)
    for st in steps:
        st["seconds"] = seconds.get(st["step"])
        stats.rejects.update(st["reasons"])
        logger.info("filter/%s: %d -> %d (%d dropped)", st["step"], st["rows_in"],
                    st["rows_out"], st["dropped"])
    if sum(st["dropped"] for st in steps):
        rejected_of(ds).write_parquet(str(stage.path / "rejects"))
    survivors = survivors_of(ds)
    if cfg.judge.enabled:
        # The judge is the last and costliest step: it sees only the survivors, and its
        # rejects (with their scores) go to their own folder.
        t0 = time.time()
        judged = judge_dataset(survivors, cfg.judge, run_dir, task).materialize()
        jstep = step_counts(judged, judged.count(), ["judge"])[0]
        jstep["seconds"] = round(time.time() - t0, 3)
        stats.rejects.update(jstep["reasons"])
        steps.append(jstep)
        logger.info("filter/judge: %d -> %d (%d dropped)", jstep["rows_in"],
                    jstep["rows_out"], jstep["dropped"])
        if jstep["dropped"]:
            rejected_of(judged).write_parquet(str(stage.path / "judge_rejects"))
        survivors = survivors_of(judged)
    survivors = survivors.drop_columns(list(REJECT_COLUMNS)).materialize()
    survivors.write_parquet(str(stage.path / "survivors"))
    stats.rows_out = survivors.count()

    built, skipped = build_datasets(survivors, task, shots, fs_records, cfg, stage.path,
                                    run_dir, steps, eval_texts,
                                    _survivor_schema(input_path, task, cfg))
    decontam_report["datasets"] = {name: info.get("decontamination", {})
                                   for name, info in built.items()}
    atomic_write_json(stage.path / "decontamination.json", decontam_report)
    stats.extra = {
        "task": task.name, "input": str(input_path), "input_columns": cols,
        "fewshots": len(shots), "steps": steps,
        "steps_seconds_note": "per-row steps (leakage, decontamination marks) run fused into "
                              "the next global step, so their time is counted there",
        "datasets": {k: {kk: vv for kk, vv in v.items() if kk != "decontamination"}
                     for k, v in built.items()},
        "sizes_skipped": skipped,
        "decontamination": {k: v for k, v in decontam_report.items() if k != "datasets"},
    }
    if skipped:
        logger.warning("filter: %s", too_few_message(skipped, built))
    return stage.finish(cfg, stats)


def _survivor_schema(input_path: Path, task: Any, cfg: FilterConfig) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.ParquetDataset(str(input_path)).schema
    if cfg.judge.enabled:
        for c in judge_criteria(bool(getattr(task, "is_multiple_choice", False))):
            schema = schema.append(pa.field(f"judge_{c}", pa.int64()))
    return schema


def too_few_message(skipped: Mapping[str, Any], built: Mapping[str, Any]) -> str:
    """One line naming the sizes that could not be built and those that were."""
    parts = [f"{k} (needs {v['needed_generated']} generated, {v['available']} survived)"
             for k, v in skipped.items()]
    return (f"too few surviving samples for size(s) {', '.join(parts)}; built: "
            f"{', '.join(built) or 'none'}. Generate more samples or lower "
            "filter.datasets.sizes.")


def _decontam_step(ds: Any, cfg: DecontaminationConfig, eval_texts: dict[str, list[str]],
                   report: dict[str, Any]) -> Any:
    import ray

    ns = sorted({cfg.ngram, *cfg.report_ngrams})
    indexes = {(name, n): NgramIndex(texts, n) for name, texts in eval_texts.items()
               for n in ns}
    marked = ds.map_batches(decontam_batch, batch_size=cfg.batch_size, batch_format="pyarrow",
                            fn_kwargs={"indexes": ray.put(indexes), "drop_n": cfg.ngram,
                                       "drop": cfg.drop,
                                       "max_hits": cfg.max_hits_per_row}).materialize()
    hits: dict[str, list[list[int]]] = {f"{name}:{n}": [] for name, n in indexes}
    for b in marked.select_columns(["_decontam"]).iter_batches(batch_format="pyarrow",
                                                                batch_size=65_536):
        for raw in b.column("_decontam").to_pylist():
            if raw is None:  # rejected by an earlier step
                continue
            row = json.loads(raw)
            for key, lst in hits.items():
                lst.append(row.get(key, []))
    report.update({
        "ngram": cfg.ngram, "report_ngrams": [n for n in ns if n != cfg.ngram],
        "drop": cfg.drop, "max_hits_per_row": cfg.max_hits_per_row,
        "eval_sets": {
            name: {"path": next(e.path for e in cfg.eval_sets if e.name == name),
                   "items": len(texts),
                   **{str(n): overlap_summary(hits[f"{name}:{n}"], len(texts)) for n in ns}}
            for name, texts in eval_texts.items()},
        "note": "computed on the samples entering the step (after exact dedup and leakage); "
                "per-dataset figures under 'datasets'",
    })
    return marked


JUDGE_PROMPT_COLUMNS = ("prompt", "prompt_token_ids", "messages", "schema", "max_new_tokens",
                        "_judge_doc_missing")


def resolve_judge(cfg: JudgeConfig, run_dir: Path) -> dict[str, Any]:
    """Backend, model, tokenizer, backend settings and document source of the judge.

    Unset fields come from the generate stage's resolved config in the run directory, so by
    default the judge runs on the same backend and model as the generator.
    """
    data = _stage_config(run_dir, "generate")  # the generate section, written by StageDir
    gen = data.get("generate", data) or {}
    backend = cfg.backend or gen.get("backend")
    model = cfg.model or gen.get("model")
    if not backend or not model:
        raise FilterError("filter.judge: no backend/model configured and none found in "
                          f"{run_dir / 'generate' / 'config.yaml'}; set filter.judge.backend "
                          "and filter.judge.model")
    tokenizer = cfg.tokenizer or (gen.get("tokenizer") if not cfg.model else None)
    if tokenizer is None and backend != "openai":
        tokenizer = model
    settings = getattr(cfg, backend)
    if settings is None:
        models = {"hf": HFBackendConfig, "openai": OpenAIBackendConfig,
                  "vllm": VLLMBackendConfig}
        settings = models[backend].model_validate(gen.get(backend) or {})
    docs = cfg.doc_texts or gen.get("input_path")
    if docs is None:
        docs = str(run_dir / "retrieve" / "corpus_samples.parquet")
    if not Path(docs).exists():
        raise FilterError(f"filter.judge: source documents {docs} do not exist; set "
                          "filter.judge.doc_texts to a Parquet/JSONL file with doc_id, text")
    from craft_ray.generate import local_ref

    return {"backend": backend, "model": local_ref(model) or model,
            "tokenizer": local_ref(tokenizer), "settings": settings, "docs": str(docs)}


def judge_schema(criteria: Sequence[str]) -> dict[str, Any]:
    """JSON schema of the judge's reply: one integer 1-10 per criterion."""
    return {"type": "object",
            "properties": {c: {"type": "integer", "enum": list(range(1, 11))} for c in criteria},
            "required": list(criteria), "additionalProperties": False}


def _read_doc_texts(path: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    if path.endswith((".jsonl", ".json")):
        out = {}
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    out[str(rec["doc_id"])] = str(rec.get("text") or "")
        return out
    t = pq.read_table(path, columns=["doc_id", "text"])
    return dict(zip(map(str, t.column("doc_id").to_pylist()),
                    (str(x or "") for x in t.column("text").to_pylist())))


class JudgePromptBuilder:
    """Ray Data actor: loads the source documents and the tokenizer once, builds judge
    prompts (the generation backends' input columns) for batches of samples."""

    def __init__(self, docs: str, tokenizer: str | None, task_name: str,
                 is_multiple_choice: bool, max_doc_chars: int, max_new_tokens: int) -> None:
        from craft_ray.generate import load_tokenizer

        self.docs = _read_doc_texts(docs)
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        self.task_name = task_name
        self.is_mc = is_multiple_choice
        self.max_doc_chars = max_doc_chars
        self.max_new_tokens = max_new_tokens
        self.schema = json.dumps(judge_schema(judge_criteria(is_multiple_choice)))

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        prompts, ids, msgs, missing = [], [], [], []
        for doc_id, text in zip(table.column("doc_id").to_pylist(),
                                table.column("sample_text").to_pylist()):
            doc = self.docs.get(str(doc_id))
            missing.append(doc is None)
            content = judge_prompt(self.task_name, str(text), doc or "", self.is_mc,
                                   self.max_doc_chars)
            m = [{"role": "user", "content": content}]
            msgs.append(json.dumps(m, ensure_ascii=False))
            if self.tokenizer is not None:
                rendered = self.tokenizer.apply_chat_template(m, tokenize=False,
                                                              add_generation_prompt=True)
                prompts.append(rendered)
                ids.append(list(self.tokenizer(rendered, add_special_tokens=False)
                                ["input_ids"]))
            else:
                prompts.append("")
                ids.append([])
        n = table.num_rows
        cols = {"prompt": pa.array(prompts, pa.string()),
                "prompt_token_ids": pa.array(ids, pa.list_(pa.int64())),
                "messages": pa.array(msgs, pa.string()),
                "schema": pa.array([self.schema] * n, pa.string()),
                "max_new_tokens": pa.array([self.max_new_tokens] * n, pa.int64()),
                "_judge_doc_missing": pa.array(missing, pa.bool_())}
        for name, col in cols.items():
            table = table.append_column(name, col)
        return table


def judge_parse_batch(table: Any, criteria: list[str], min_scores: dict[str, int]) -> Any:
    """Ray Data UDF (pyarrow): judge reply -> ``judge_*`` score columns and reject marks."""
    import pyarrow as pa

    texts = table.column("text").to_pylist()
    errors = table.column("error").to_pylist()
    missing = table.column("_judge_doc_missing").to_pylist()
    scores, reasons, details = [], [], []
    for text, err, miss in zip(texts, errors, missing):
        sc = None if err else parse_judge_scores(text or "", criteria)
        scores.append(sc)
        if miss:
            reasons.append("judge_missing_document")
            details.append("source document not found (doc_id not in the document file)")
        elif err:
            reasons.append("judge_backend_error")
            details.append(str(err))
        else:
            r, d = judge_reason(sc, {c: v for c, v in min_scores.items() if c in criteria})
            reasons.append(r)
            details.append(d if r != "judge_unparseable" else f"{d}: {str(text)[:200]!r}")
    drop = [c for c in (*JUDGE_PROMPT_COLUMNS, "text", "tokens_in", "tokens_out",
                        "gen_seconds", "finish_reason", "error", "error_detail")
            if c in table.column_names]
    table = table.drop_columns(drop)
    for c in criteria:
        table = table.append_column(f"judge_{c}", pa.array(
            [s[c] if s else None for s in scores], pa.int64()))
    return _with_reasons(table, "judge", reasons, details)


def judge_dataset(ds: Any, cfg: JudgeConfig, run_dir: Path, task: Any) -> Any:
    """Lazy: samples -> judge prompts -> generation backend -> scores and reject marks."""
    import ray.data

    r = resolve_judge(cfg, run_dir)
    criteria = list(judge_criteria(bool(getattr(task, "is_multiple_choice", False))))
    prompts = ds.map_batches(
        JudgePromptBuilder, batch_format="pyarrow", batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=cfg.prompt_concurrency), num_cpus=1,
        fn_constructor_kwargs={"docs": r["docs"], "tokenizer": r["tokenizer"],
                               "task_name": task.name,
                               "is_multiple_choice": "correctness" in criteria,
                               "max_doc_chars": cfg.max_doc_chars,
                               "max_new_tokens": cfg.max_new_tokens})
    sampling = {"temperature": cfg.temperature, "top_p": 1.0, "top_k": -1, "seed": cfg.seed,
                "guided": cfg.guided_decoding}
    if r["backend"] == "hf":
        from craft_ray.backends.hf import hf_generate

        gen = hf_generate(prompts, r["model"], r["tokenizer"], r["settings"], sampling)
    elif r["backend"] == "openai":
        from craft_ray.backends.openai_compat import openai_generate

        gen = openai_generate(prompts, r["model"], r["settings"], sampling)
    else:
        from craft_ray.backends.vllm import vllm_generate

        gen = vllm_generate(prompts, r["model"], r["settings"], sampling)
    return gen.map_batches(judge_parse_batch, batch_format="pyarrow", batch_size=256,
                           num_cpus=0.25, fn_kwargs={"criteria": criteria,
                                                     "min_scores": dict(cfg.min_scores)})


# --- final datasets -----------------------------------------------------------------------


def _fewshot_rows(task: Any, shots: Sequence[Any], records: Sequence[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    return [{**rec, "is_few_shot": 1, "sample_id": f"fewshot:{s.id}", "task": task.name,
             "doc_id": None, "corpus": None, "fewshot_ids": [s.id]}
            for s, rec in zip(shots, records)]


def output_columns(task: Any, available: Sequence[str]) -> list[str]:
    """Columns of a final dataset: record fields, is_few_shot, provenance, judge scores."""
    judge = [c for c in available if c.startswith("judge_")]
    return [*task.record_fields, "is_few_shot",
            *[c for c in PROVENANCE_COLUMNS if c in available or c == "sample_id"], *judge]


def select_nested(table: Any, sizes: Mapping[str, int], n_fewshots: int
                  ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Generated rows per size (a prefix of the priority-sorted table), and the skipped sizes.

    Nesting holds because every size is a prefix of the same order.
    """
    available = table.num_rows
    take, skipped = {}, {}
    for name, total in sizes.items():
        need = total - n_fewshots
        if need <= available:
            take[name] = need
        else:
            skipped[name] = {"size": total, "needed_generated": need, "available": available}
    return take, skipped


def build_datasets(ds: Any, task: Any, shots: Sequence[Any], fs_records: Sequence[dict],
                   cfg: FilterConfig, stage_path: Path, run_dir: Path,
                   steps: list[dict[str, Any]], eval_texts: dict[str, list[str]],
                   empty_schema: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write every size that can be built; returns (built info, skipped sizes)."""
    import pyarrow as pa

    dcfg = cfg.datasets
    n_fs = len(shots) if dcfg.include_fewshots else 0
    need_max = max(dcfg.sizes.values()) - n_fs
    ranked = ds.map_batches(priority_batch, batch_format="pyarrow",
                            fn_kwargs={"seed": dcfg.seed}).sort("_priority")
    batches = list(_arrow_batches(ranked.limit(max(need_max, 0))))
    if batches:
        table = pa.concat_tables(batches)
    else:  # no survivor: an empty table of the input's columns (+ judge scores)
        table = empty_schema.empty_table()
    cols = output_columns(task, table.column_names)
    gen = table.append_column("is_few_shot", pa.array([0] * table.num_rows, pa.int64()))
    gen = gen.select([c for c in cols if c in gen.column_names])
    fs_rows = _fewshot_rows(task, shots, fs_records) if dcfg.include_fewshots else []
    fs_table = pa.Table.from_pylist([{c: r.get(c) for c in gen.column_names} for r in fs_rows],
                                    schema=gen.schema) if fs_rows else None
    take, skipped = select_nested(gen, dcfg.sizes, n_fs)
    out_root = stage_path / "datasets"
    built: dict[str, Any] = {}
    for name in sorted(take, key=lambda k: dcfg.sizes[k]):
        part = gen.slice(0, take[name])
        if fs_table is not None:
            part = pa.concat_tables([part, fs_table])
        info = write_dataset(part, out_root / name, name, task, cfg, run_dir, steps,
                             eval_texts)
        built[name] = info
    return built, skipped


def _arrow_batches(ds: Any) -> Any:
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=65_536):
        yield b.drop_columns(["_priority"]) if "_priority" in b.column_names else b


def write_dataset(table: Any, out: Path, name: str, task: Any, cfg: FilterConfig,
                  run_dir: Path, steps: list[dict[str, Any]],
                  eval_texts: dict[str, list[str]]) -> dict[str, Any]:
    """One size: hf/ (save_to_disk), data.parquet, data.jsonl, README.md; written to a
    temporary folder and renamed into place, so a size folder is never half-written."""
    import datasets
    import pyarrow.parquet as pq

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    datasets.Dataset(table).save_to_disk(str(tmp / "hf"))
    pq.write_table(table, tmp / "data.parquet")
    with (tmp / "data.jsonl").open("w", encoding="utf-8") as fh:
        for row in table.to_pylist():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    decontam = {}
    if eval_texts:
        texts = [task.sample_text(r) for r in table.select(task.record_fields).to_pylist()]
        dc = cfg.decontamination
        decontam = {
            ename: {str(n): overlap_summary(NgramIndex(etexts, n).hits(texts,
                                                                       dc.max_hits_per_row),
                                            len(etexts))
                    for n in sorted({dc.ngram, *dc.report_ngrams})}
            for ename, etexts in eval_texts.items()}
    info = {"rows": table.num_rows,
            "generated": int(sum(1 for x in table.column("is_few_shot").to_pylist() if not x)),
            "few_shots": int(sum(1 for x in table.column("is_few_shot").to_pylist() if x)),
            "path": str(out), "decontamination": decontam}
    (tmp / "README.md").write_text(dataset_card(table, name, task, cfg, run_dir, steps, info),
                                   encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return info


def _yaml_section(run_dir: Path, stage: str, key: str) -> str | None:
    data = _stage_config(run_dir, stage)
    if not data:
        return None
    section = data.get(key, data)
    return yaml.safe_dump(section, sort_keys=False, allow_unicode=True).strip()


def dataset_card(table: Any, name: str, task: Any, cfg: FilterConfig, run_dir: Path,
                 steps: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """README.md of one size: composition, corpora mix, retrieval, generator, filter counts."""
    n = table.num_rows
    corpora = Counter(c for c, f in zip(table.column("corpus").to_pylist()
                                        if "corpus" in table.column_names else [None] * n,
                                        table.column("is_few_shot").to_pylist()) if not f)
    mix = "\n".join(f"| {c or '(unknown)'} | {k} | {100.0 * k / max(1, info['generated']):.1f}% |"
                    for c, k in corpora.most_common()) or "| (none) | 0 | |"
    filt = "\n".join(f"| {s['step']} | {s['rows_in']} | {s['rows_out']} | {s['dropped']} |"
                     for s in steps) or "| (no steps) | | | |"
    retrieve = _yaml_section(run_dir, "retrieve", "retrieve")
    generate = _yaml_section(run_dir, "generate", "generate")
    dec = info.get("decontamination") or {}
    dec_rows = "\n".join(
        f"| {e} | {n_} | {v['samples_overlapping']} ({v['samples_overlapping_pct']}%) | "
        f"{v['eval_items_overlapping']} ({v['eval_items_overlapping_pct']}%) |"
        for e, per in dec.items() for n_, v in per.items())
    size_cat = "n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K" \
        if n < 100_000 else "100K<n<1M"
    lines = [
        "---",
        f"pretty_name: craft-ray {task.name} {name}",
        "size_categories:",
        f"- {size_cat}",
        "tags:",
        "- synthetic",
        "- craft",
        "configs:",
        "- config_name: default",
        "  data_files: data.parquet",
        "---",
        "",
        f"# {task.name} — size {name} ({n} samples)",
        "",
        "Built by `craft-ray filter` (CRAFT: Corpus Retrieval and Augmentation for "
        f"Fine-Tuning) in run directory `{run_dir}`.",
        "",
        "## Composition",
        "",
        f"- generated samples: {info['generated']}",
        f"- human few-shots (`is_few_shot=1`): {info['few_shots']}",
        f"- chosen with seed {cfg.datasets.seed} by hash priority; smaller sizes of this run "
        "are subsets of larger ones.",
        "",
        "## Corpora mix (generated samples)",
        "",
        "| corpus | samples | share |",
        "|---|---|---|",
        mix,
        "",
        "## Retrieval settings",
        "",
        f"```yaml\n{retrieve}\n```" if retrieve else "not available (no retrieve/config.yaml "
        "in the run directory)",
        "",
        "## Generator",
        "",
        f"```yaml\n{generate}\n```" if generate else "not available (no generate/config.yaml "
        "in the run directory)",
        "",
        "## Filtering (all generated samples of the run)",
        "",
        "| step | in | out | dropped |",
        "|---|---|---|---|",
        filt,
        "",
        "## Decontamination (this dataset)",
        "",
        "| eval set | n-gram | samples overlapping | eval items overlapping |",
        "|---|---|---|---|",
        dec_rows or "| (no eval sets configured) | | | |",
        "",
        "## Columns",
        "",
        f"`{'`, `'.join(table.column_names)}`: the task's record fields "
        f"({', '.join(task.record_fields)}), `is_few_shot`, and provenance.",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_from_disk",
        f'ds = load_from_disk("{name}/hf")',
        "```",
        "",
    ]
    return "\n".join(lines)
