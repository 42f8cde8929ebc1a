"""Evaluation stage: base models, adapters and merged models on multiple-choice and generative
evaluation sets.

Multiple-choice sets (accuracy) follow CRAFT's method: one greedy next token after the prompt;
the prediction is the argmax of the next-token log-probability over the letters the item has
(A-D, A-E, A/B). A letter that is not among the scored tokens counts as -inf; an item with no
usable letter is wrong.

- ``backend: hf``: a Ray Data actor pool, each actor loading the model (+ PEFT adapter) once;
  the letter scores come straight from the last position's logits (full vocabulary, so no
  letter is ever missing there).
- ``backend: vllm``: ``ray.data.llm`` vLLM engines, ``max_tokens=1`` and the top-k logprobs
  of that token; letters outside the top k are -inf, as in CRAFT. Adapters are served as
  LoRA requests (no merge needed).

Generative sets (``cnn_dailymail`` -> summarization, ``recipenlg`` -> recipegen): the evaluated
model answers each prompt itself (greedy by default, ``generation.max_new_tokens`` or the task's
CRAFT budget), on the same backends and with the model loaded the same way (hf actors; vLLM
through :mod:`craft_ray.backends.vllm` with the adapter as a LoRA request). Every answer gets
ROUGE-L F1 against the reference; with ``judge`` set, all (model, set) pairs then go to the LLM
judge in one call (:func:`craft_ray.judging.judge_groups`: pairwise vs the reference, seeded
order swap), and the win rate is reported CRAFT's way (ties and unparsable as losses, the
metric) and over decided pairs only.

Models: ``models`` lists them; ``sweep`` adds every finished trial of a sweep (base model +
the trial's adapter, with its size and seed) read from ``RUN_DIR/sweep/results.jsonl``.

Prompts are built exactly as training built them: the eval item becomes a task record
(``question``, ``options`` ["A. ...", ...], ``answer``), ``Task.training_pair(record)[0]`` is
the prompt text, and the model's chat template (or the plain template) is applied on top and
tokenised as training does (``template``, ``plain_template``, ``system_prompt``: the same keys
as ``train``), so a fine-tuned adapter is scored on exactly the token sequence it learned.

Outputs under ``RUN_DIR/evaluate/``::

    {model}/{set}/predictions.parquet|.jsonl   MC: prompt, letter scores, prediction, gold,
                                               correct; generative: instruction, prompt,
                                               prediction, reference, rougeL_f1, judge verdict
    {model}/{set}/results.json                 MC: accuracy, n, 95% CI, gold/prediction counts;
                                               generative: rougeL_f1 (+CI), win rates (+CI),
                                               wins/losses/ties/unparsable
    rejects/{set}.jsonl                        eval rows that could not be parsed, with reason
    results.json, results.md, accuracy.png, report.md    all (model, set) pairs together
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from craft_ray.evalsets.loading import load_eval_set
from craft_ray.models.gguf import resolve_model_path
from craft_ray.models.hf import has_tokenizer, local_adapter
from craft_ray.runtime import StageDir, StageStats, storage
from craft_ray.runtime.progress import report_progress
from craft_ray.stages.evaluate.actors import HFLetterScorer, generate_rows, map_hf_actors
from craft_ray.stages.evaluate.candidates import check_models, resolve_models
from craft_ray.stages.evaluate.config import EvaluateConfig, EvaluateStageConfig, ModelSpec
from craft_ray.stages.evaluate.prompts import (
    fit_generative_prompts,
    generative_task,
    load_task,
    prompt_rows,
    render_prompts,
    task_prompt,
)
from craft_ray.stages.evaluate.results import (
    clean_gen_row,
    clean_row,
    gen_pair_hash,
    letter_ids_of,
    pair_hash,
    result_head,
    summarise,
    write_predictions,
    write_summary,
)
from craft_ray.stages.evaluate.scoring import summarise_generative
from craft_ray.stages.evaluate.vllm import vllm_processor_config, vllm_request, vllm_scores

logger = logging.getLogger(__name__)


# --- stage -----------------------------------------------------------------------------------


def stage_root(stage_cfg: EvaluateStageConfig) -> str:
    cfg = stage_cfg.evaluate
    return cfg.output_dir or storage.join(stage_cfg.run_dir, "evaluate")


def _score_rows(cfg: EvaluateConfig, model: ModelSpec, rows: list[dict[str, Any]],
                letter_ids: dict[str, list[int]]) -> list[dict[str, Any]]:
    import ray.data

    ds = ray.data.from_items(rows)
    if cfg.backend == "hf":
        scored = map_hf_actors(ds, cfg, model, HFLetterScorer, {
            "letter_ids": letter_ids, "forward_batch_size": cfg.forward_batch_size,
            "max_prompt_tokens": cfg.max_prompt_tokens})
    else:
        from functools import partial

        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ImportError("backend: vllm needs vLLM on the workers: pip install "
                              "'craft-ray[gpu]' (or pip install vllm)") from exc
        from ray.data.llm import build_processor

        processor = build_processor(
            vllm_processor_config(cfg, model),
            preprocess=partial(vllm_request, top_logprobs=cfg.vllm.top_logprobs,
                               adapter=model.adapter),
            postprocess=partial(vllm_scores, letter_ids=letter_ids),
        )
        scored = processor(ds)
    return [clean_row(r) for r in scored.take_all()]


def _load_sets(cfg: EvaluateConfig, base_dir: str | Path | None
               ) -> dict[str, tuple[Any, list[Any], list[Any], Any]]:
    """Every set loaded first: a missing file or an unreachable hub stops before any model
    loads. ``{display name: (set config, items, rejects, generative task or None)}``."""
    loaded = {}
    for es in cfg.sets:
        items, rejects = load_eval_set(es, base_dir)
        gtask = generative_task(cfg, es) if es.kind == "generative" else None
        loaded[es.display_name] = (es, items, rejects, gtask)
    return loaded


def _model_rows(cfg: EvaluateConfig, model: ModelSpec, tok: Any, task: Any,
                loaded: dict[str, tuple[Any, list[Any], list[Any], Any]], out: str,
                force: bool, results: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Prompt rows of one model over every set it has not done yet (done pairs are appended
    to ``results``): ``mc_rows``, ``mc_sets``, ``gen_rows``, ``gen_sets``."""
    todo: dict[str, list[Any]] = {"mc_rows": [], "mc_sets": [], "gen_rows": [], "gen_sets": []}
    for name, (es, items, _r, gtask) in loaded.items():
        max_new = (cfg.generation.max_new_tokens or gtask.max_new_tokens) if gtask else 0
        key = (gen_pair_hash(cfg, model, es, max_new) if gtask
               else pair_hash(cfg, model, es))
        res_path = storage.join(out, model.name, name, "results.json")
        done = storage.read_json(res_path) if not force and storage.is_file(res_path) else {}
        if done.get("pair_hash") == key:
            logger.info("evaluate: %s on %s already done; keeping it", model.name, name)
            results.append(done)
            continue
        if gtask is None:
            prompts, ids = render_prompts([task_prompt(it, task) for it in items], tok,
                                          cfg.template, cfg.plain_template,
                                          cfg.system_prompt)
            todo["mc_sets"].append((name, es, key))
            todo["mc_rows"] += prompt_rows(model, name, prompts, ids, cfg, [
                {"id": it.id, "letters": "".join(it.letters), "gold": it.gold}
                for it in items])
        else:
            pairs = [gtask.training_pair(it.record) for it in items]
            prompts, ids, cut = fit_generative_prompts(
                [p for p, _ in pairs], tok, cfg.max_prompt_tokens, cfg.template,
                cfg.plain_template, cfg.system_prompt)
            todo["gen_sets"].append((name, es, key))
            todo["gen_rows"] += prompt_rows(model, name, prompts, ids, cfg, [
                {"id": it.id, "instruction": p, "reference": ref, "max_new_tokens": max_new,
                 "truncated": c}
                for it, (p, ref), c in zip(items, pairs, cut)])
    return todo


def _score_model(cfg: EvaluateConfig, model: ModelSpec, tok: Any, todo: dict[str, list[Any]],
                 out: str, stats: StageStats) -> list[dict[str, Any]]:
    """Multiple-choice sets of one model scored, written per pair; their results."""
    logger.info("evaluate: scoring %s (%s%s) on %d items with %s", model.name,
                model.model, f" + {model.adapter}" if model.adapter else "",
                len(todo["mc_rows"]), cfg.backend)
    scored = _score_rows(cfg, model, todo["mc_rows"], letter_ids_of(tok, cfg))
    stats.rows_out += len(scored)
    results = []
    for name, es, key in todo["mc_sets"]:
        rows = sorted((r for r in scored if r["eval_set"] == name), key=lambda r: r["id"])
        pair_dir = storage.join(out, model.name, name)
        write_predictions(pair_dir, rows)
        res = {**result_head(cfg, model, es, name, key), **summarise(rows, cfg.ci_level)}
        storage.write_json(storage.join(pair_dir, "results.json"), res)
        logger.info("evaluate: %s on %s: accuracy %.4f (n=%d, %.0f%% CI %.4f-%.4f)",
                    model.name, name, res["accuracy"], res["n"], 100 * cfg.ci_level,
                    res["ci_low"], res["ci_high"])
        results.append(res)
    return results


def _answer_model(cfg: EvaluateConfig, model: ModelSpec, todo: dict[str, list[Any]],
                  stats: StageStats) -> list[dict[str, Any]]:
    """Generative sets of one model answered; pairs waiting for ROUGE-L / the judge."""
    logger.info("evaluate: %s (%s%s) answers %d generative items with %s",
                model.name, model.model, f" + {model.adapter}" if model.adapter
                else "", len(todo["gen_rows"]), cfg.backend)
    answered = generate_rows(cfg, model, todo["gen_rows"])
    stats.rows_out += len(answered)
    pending = []
    for name, es, key in todo["gen_sets"]:
        rows = sorted((clean_gen_row(r) for r in answered if r["eval_set"] == name),
                      key=lambda r: r["id"])
        pending.append({"model": model, "name": name, "es": es, "key": key, "rows": rows})
    return pending


def _write_set_rejects(loaded: dict[str, Any], out: str) -> StageStats:
    """Each eval set's malformed items to ``rejects/SET.jsonl``; the stage's stats, counting
    them (rows in: every item read)."""
    stats = StageStats("evaluate")
    for name, (_es, items, rejects, _t) in loaded.items():
        stats.rows_in += len(items) + len(rejects)
        stats.rejects.update(f"{name}:{r.reason}" for r in rejects)
        storage.write_text(storage.join(out, "rejects", f"{name}.jsonl"), "".join(
            json.dumps(r.__dict__) + "\n" for r in rejects))
    return stats


def run_evaluate(stage_cfg: EvaluateStageConfig, *, force: bool = False,
                 base_dir: str | Path | None = None,
                 judge_generate: Any | None = None) -> dict[str, Any]:
    """Run the evaluation stage (Ray must be initialised). Returns the stage's stats.

    Multiple-choice sets are scored by letter log-probs; on generative sets each model
    writes its answers, scored by ROUGE-L and (with ``judge``) the judge's win rate, all
    (model, set) pairs in one judge call. Every pair whose results exist for the same
    settings is kept (resume); ``force`` recomputes all. The summary files are rewritten from
    all pairs at the end. ``judge_generate`` (prompts -> answers) replaces the configured
    judge backend (tests, custom judges).
    """
    from transformers import AutoTokenizer

    from craft_ray.report.plots import metric_of

    cfg = stage_cfg.evaluate
    root = stage_root(stage_cfg)
    stage = StageDir(storage.parent(root), storage.name(root))
    models = resolve_models(cfg, stage_cfg.run_dir)
    names = [m.name for m in models]
    if not force and stage.is_complete(cfg):
        done = stage.read_stats()
        if done.get("models", names) == names:
            logger.info("evaluate: already complete in %s (same config); skipping",
                        storage.redact(stage.location))
            return done
        logger.info("evaluate: the sweep has other trials than last time; updating")
    task = load_task(cfg.task) if cfg.task and any(
        es.kind == "multiple_choice" for es in cfg.sets) else None
    loaded = _load_sets(cfg, base_dir)
    check_models(cfg, models)
    stage.begin(cfg)
    stats = _write_set_rejects(loaded, stage.location)
    results: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # generated pairs waiting for ROUGE-L / the judge
    planned = 0  # the console's line: items of the models seen so far
    for model in models:
        adapter = local_adapter(model.adapter)
        tok = AutoTokenizer.from_pretrained(adapter if adapter and has_tokenizer(adapter)
                                            else resolve_model_path(model.model))
        todo = _model_rows(cfg, model, tok, task, loaded, stage.location, force, results)
        planned += len(todo["mc_rows"]) + len(todo["gen_rows"])
        report_progress(total=planned, unit="items")
        if todo["mc_rows"]:
            results += _score_model(cfg, model, tok, todo, stage.location, stats)
        if todo["gen_rows"]:
            pending += _answer_model(cfg, model, todo, stats)

    results += _finish_generative(cfg, stage.location, pending, judge_generate)
    write_summary(stage.location, results, plot=cfg.plot)
    stats.extra["results"] = [{"model": r["model"], "eval_set": r["eval_set"],
                               "metric": metric_of(r)[0], "value": metric_of(r)[1],
                               "n": r["n"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
                              for r in results]
    stats.extra["models"] = names
    stats.extra["outputs"] = storage.redact(stage.location)
    return stage.finish(cfg, stats)


def _finish_generative(cfg: EvaluateConfig, out: str, pending: list[dict[str, Any]],
                       judge_generate: Any | None) -> list[dict[str, Any]]:
    """ROUGE-L of every generated pair, then (with a judge) one judge call over all pairs;
    writes each pair's predictions and results; returns the results."""
    from craft_ray.judging import backend_generate, judge_groups, rouge_l, warn_judge_errors

    if not pending:
        return []
    for p in pending:
        rouge = rouge_l([r["prediction"] for r in p["rows"]], [r["reference"] for r in p["rows"]])
        for r, f1 in zip(p["rows"], rouge["per_item"]):
            r["rougeL_f1"] = float(f1)
    judged: list[dict[str, Any] | None] = [None] * len(pending)
    if cfg.judge is not None or judge_generate is not None:
        gen = judge_generate
        if gen is None:
            assert cfg.judge is not None
            gen = backend_generate(cfg.judge, cfg.judge_seed, "evaluate.judge")
        logger.info("evaluate: judging %d pairs (%d items)", len(pending),
                    sum(len(p["rows"]) for p in pending))
        groups = [([r["instruction"] for r in p["rows"]], [r["reference"] for r in p["rows"]],
                   [r["prediction"] for r in p["rows"]]) for p in pending]
        for i, (summary, jrows) in enumerate(judge_groups(groups, gen, cfg.judge_seed,
                                                          cfg.judge_template)):
            judged[i] = summary
            for r, j in zip(pending[i]["rows"], jrows):
                r.update({k: j[k] for k in ("swapped", "judge_answer", "verdict", "outcome",
                                            "judge_error", "judge_error_detail")})
            warn_judge_errors(f"evaluate: {pending[i]['model'].name} on {pending[i]['name']}",
                              jrows)
    results = []
    for p, summary in zip(pending, judged):
        model, name = p["model"], p["name"]
        pair_dir = storage.join(out, model.name, name)
        write_predictions(pair_dir, p["rows"])
        res = {**result_head(cfg, model, p["es"], name, p["key"]),
               **summarise_generative(p["rows"], cfg.ci_level, summary)}
        if summary is not None:
            res["judge_model"] = cfg.judge.model if cfg.judge else "custom"
        storage.write_json(storage.join(pair_dir, "results.json"), res)
        logger.info("evaluate: %s on %s: ROUGE-L %.4f%s (n=%d)", model.name, name,
                    res["rougeL_f1"], f", win rate {res['win_rate']:.4f}"
                    if summary is not None else "", res["n"])
        results.append(res)
    return results
