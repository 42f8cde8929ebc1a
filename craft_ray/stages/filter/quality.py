"""The quality judge of the filter stage: prompts, score parsing, the judged dataset."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from craft_ray.backends.hf import HFBackendConfig
from craft_ray.backends.openai_compat import OpenAIBackendConfig
from craft_ray.backends.vllm import VLLMBackendConfig
from craft_ray.runtime import storage
from craft_ray.stages.filter.config import (
    JUDGE_CRITERIA,
    JUDGE_CRITERIA_QA,
    FilterError,
    QualityJudgeConfig,
    read_stage_config,
)
from craft_ray.stages.filter.rows import with_reasons

# --- LLM judge (plain functions) -----------------------------------------------------------


QUALITY_JUDGE_TEMPLATE = """\
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


def quality_judge_prompt(task_name: str, sample_text: str, document: str, is_multiple_choice: bool,
                 max_doc_chars: int = 6000) -> str:
    """The judge prompt for one sample and its source document (document cut to a budget)."""
    crit = judge_criteria(is_multiple_choice)
    doc = document if len(document) <= max_doc_chars else document[:max_doc_chars] + " [...]"
    example = json.dumps({c: 7 for c in crit})
    return QUALITY_JUDGE_TEMPLATE.format(task=task_name, document=doc.strip(),
                                         sample=sample_text.strip(),
                                         criteria="\n".join(_CRITERIA_TEXT[c] for c in crit),
                                         example=example)


_SCORE_LINE = re.compile(r"\b(relevance|coverage|correctness)\b\W{0,5}(\d{1,2})\b", re.I)


def parse_judge_scores(text: str, criteria: Sequence[str]) -> dict[str, int] | None:
    """Scores 1-10 per criterion from a judge reply (a JSON object, else ``name: N`` lines).

    ``None`` when any criterion is missing or out of range (the row is rejected as
    ``judge_unparseable``).
    """
    from craft_ray.tasks.base import iter_json_objects

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


JUDGE_PROMPT_COLUMNS = ("prompt", "prompt_token_ids", "messages", "schema", "max_new_tokens",
                        "_judge_doc_missing")


def resolve_judge(cfg: QualityJudgeConfig, run_dir: str | Path) -> dict[str, Any]:
    """Backend, model, tokenizer, backend settings and document source of the judge.

    Unset fields come from the generate stage's resolved config in the run directory, so by
    default the judge runs on the same backend and model as the generator.
    """
    data = read_stage_config(run_dir, "generate")  # the generate section, written by StageDir
    gen = data.get("generate", data) or {}
    backend = cfg.backend or gen.get("backend")
    model = cfg.model or gen.get("model")
    if not backend or not model:
        raise FilterError("filter.judge: no backend/model configured and none found in "
                          f"{storage.join(run_dir, 'generate', 'config.yaml')}; set "
                          "filter.judge.backend "
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
        docs = storage.join(run_dir, "retrieve", "corpus_samples.parquet")
    if not storage.exists(docs):
        raise FilterError(f"filter.judge: source documents {docs} do not exist; set "
                          "filter.judge.doc_texts to a Parquet/JSONL file with doc_id, text")
    from craft_ray.models.tokenizers import local_ref

    return {"backend": backend, "model": local_ref(model) or model,
            "tokenizer": local_ref(tokenizer), "settings": settings, "docs": str(docs)}


def judge_schema(criteria: Sequence[str]) -> dict[str, Any]:
    """JSON schema of the judge's reply: one integer 1-10 per criterion."""
    return {"type": "object",
            "properties": {c: {"type": "integer", "enum": list(range(1, 11))} for c in criteria},
            "required": list(criteria), "additionalProperties": False}


def read_doc_texts(path: str) -> dict[str, str]:
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
    return with_reasons(table, "judge", reasons, details)
