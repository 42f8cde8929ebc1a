"""Per-item predictions and the summary files of the evaluate stage."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.config import StrictModel, config_hash
from craft_ray.evalsets.base import LETTERS, EvalSetConfig
from craft_ray.judging import JudgeModelConfig
from craft_ray.runtime import storage
from craft_ray.stages.evaluate.config import EvaluateConfig, GenerationConfig, ModelSpec
from craft_ray.stages.evaluate.scoring import NEG_INF, letter_token_ids, wilson_interval


def pair_hash(cfg: EvaluateConfig, model: ModelSpec, es: EvalSetConfig) -> str:
    class _Key(StrictModel):
        model: ModelSpec
        eval_set: EvalSetConfig
        task: str | None
        backend: str
        template: str
        plain_template: str
        system_prompt: str | None
        letter_prefixes: list[str]
        top_logprobs: int | None
        max_prompt_tokens: int

    return config_hash(_Key(model=model, eval_set=es, task=cfg.task, backend=cfg.backend,
                            template=cfg.template, plain_template=cfg.plain_template,
                            system_prompt=cfg.system_prompt,
                            letter_prefixes=cfg.letter_prefixes,
                            top_logprobs=cfg.vllm.top_logprobs if cfg.backend == "vllm" else None,
                            max_prompt_tokens=cfg.max_prompt_tokens))


def summarise(rows: list[dict[str, Any]], level: float) -> dict[str, Any]:
    """accuracy, n, CI, correct, unanswered (no usable letter), gold/prediction counts."""
    n = len(rows)
    k = sum(1 for r in rows if r["correct"])
    lo, hi = wilson_interval(k, n, level)
    return {
        "metric": "accuracy", "accuracy": k / n if n else 0.0, "n": n, "correct": k,
        "ci_low": lo, "ci_high": hi, "ci_level": level, "ci_method": "wilson",
        "unanswered": sum(1 for r in rows if not r["prediction"]),
        "truncated": sum(1 for r in rows if r.get("truncated")),
        "gold_counts": dict(sorted(Counter(r["gold"] for r in rows).items())),
        "prediction_counts": dict(sorted(Counter(r["prediction"] or "none"
                                                 for r in rows).items())),
    }


def write_predictions(out_dir: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    storage.write_parquet(storage.join(out_dir, "predictions.parquet"),
                          pa.Table.from_pylist(rows))
    storage.write_text(storage.join(out_dir, "predictions.jsonl"), "".join(
        json.dumps(r, default=_json_default) + "\n" for r in rows))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def clean_row(r: dict[str, Any]) -> dict[str, Any]:
    """One per-item output row with plain Python values; None for absent letters' scores."""
    letters = [str(x) for x in r["letters"]]
    scores = {}
    for letter in LETTERS:
        v = r.get(f"score_{letter}")
        if letter in letters:
            fv = float(v) if v is not None else NEG_INF
            scores[letter] = fv if math.isfinite(fv) else None  # -inf -> null in JSON
    pred = str(r["prediction"]) or None
    return {
        "id": str(r["id"]), "eval_set": str(r["eval_set"]), "model": str(r["model_name"]),
        "prompt": str(r["prompt"]), "letters": letters,
        "letter_scores": json.dumps(scores), "prediction": pred, "gold": str(r["gold"]),
        "correct": pred == str(r["gold"]), "prompt_tokens": int(r.get("prompt_tokens") or 0),
        "truncated": bool(r.get("truncated", False)),
    }


def gen_pair_hash(cfg: EvaluateConfig, model: ModelSpec, es: EvalSetConfig,
                   max_new_tokens: int) -> str:
    class _Key(StrictModel):
        model: ModelSpec
        eval_set: EvalSetConfig
        backend: str
        template: str
        plain_template: str
        system_prompt: str | None
        max_prompt_tokens: int
        max_new_tokens: int
        generation: GenerationConfig
        judge: JudgeModelConfig | None
        judge_seed: int | None
        judge_template: str | None

    judged = cfg.judge is not None
    return config_hash(_Key(model=model, eval_set=es, backend=cfg.backend, template=cfg.template,
                            plain_template=cfg.plain_template, system_prompt=cfg.system_prompt,
                            max_prompt_tokens=cfg.max_prompt_tokens,
                            max_new_tokens=max_new_tokens, generation=cfg.generation,
                            judge=cfg.judge, judge_seed=cfg.judge_seed if judged else None,
                            judge_template=cfg.judge_template if judged else None))


def letter_ids_of(tok: Any, cfg: EvaluateConfig) -> dict[str, list[int]]:
    return letter_token_ids(tok, LETTERS, cfg.letter_prefixes)


def result_head(cfg: EvaluateConfig, model: ModelSpec, es: EvalSetConfig, name: str,
                 key: str) -> dict[str, Any]:
    return {"model": model.name, "base_model": model.model, "adapter": model.adapter,
            "group": model.series, "size": model.size, "seed": model.seed,
            "eval_set": name, "eval_source": es.name, "kind": es.kind, "backend": cfg.backend,
            "task": es.task or cfg.task, "pair_hash": key}


def clean_gen_row(r: dict[str, Any]) -> dict[str, Any]:
    """One generated item with plain Python values (scores are added later)."""
    return {"id": str(r["id"]), "eval_set": str(r["eval_set"]), "model": str(r["model_name"]),
            "instruction": str(r["instruction"]), "prompt": str(r["prompt"]),
            "prediction": str(r.get("prediction") or ""), "reference": str(r["reference"]),
            "prompt_tokens": int(r.get("prompt_tokens") or 0),
            "tokens_out": int(r.get("tokens_out") or 0),
            "finish_reason": str(r.get("finish_reason") or ""),
            "truncated": bool(r.get("truncated", False))}


def write_summary(out_dir: str, results: list[dict[str, Any]], plot: bool = True) -> None:
    """results.json (all pairs), results.md (mean ± std table), accuracy.png and report.md."""
    import tempfile

    from craft_ray.report.plots import aggregate, markdown_table, plot_vs_size, write_report

    results = sorted(results, key=lambda r: (r["eval_set"], r["model"]))
    storage.write_json(storage.join(out_dir, "results.json"), results)
    rows = aggregate(results)
    storage.write_text(storage.join(out_dir, "results.md"), markdown_table(rows))
    if not plot:
        return
    if not storage.is_uri(out_dir):
        png = plot_vs_size(rows, Path(out_dir) / "accuracy.png")
        write_report(Path(out_dir) / "report.md", rows, png, results)
        return
    with tempfile.TemporaryDirectory(prefix="craft_ray_eval_") as tmp:  # then uploaded
        png = plot_vs_size(rows, Path(tmp) / "accuracy.png")
        write_report(Path(tmp) / "report.md", rows, png, results)
        storage.upload(tmp, out_dir)
