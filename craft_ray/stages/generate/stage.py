"""Generation stage: corpus samples + few-shots -> prompts -> generator -> task samples.

The pipeline (two Ray Data executions; prompts are written in between so that what was asked
is on disk next to what came back)::

    corpus_samples.parquet -> map_batches(PromptBuilder)       actor pool, tokenizer once/actor
                           -> RUN_DIR/generate/prompts/          one row per prompt
    prompts (kept rows)    -> backend (hf | openai | vllm)       same output columns for all
                           -> map_batches(parse_batch)           JSON extraction + validation
                           -> RUN_DIR/generate/generations/      one row per generation

Then the driver splits the generations into ``raw.parquet`` (every generation),
``clean.parquet`` (valid task samples, the contract of the filter stage) and
``rejects.parquet`` (with reasons); prompts dropped before generation (too long, empty text)
go to ``prompt_drops.parquet``.

Invariants (checked before ``_SUCCESS`` is written):
``prompts = raw + prompt drops`` and ``raw = clean + rejects``: no row is lost.

Reproducibility: prompt ``j`` of document ``d`` draws its few-shots (and, for csqa, its
question/statement variant) from ``random.Random(f"{seed}:{d}:{j}")``, so a rerun builds the
same prompts; sampling is seeded per row where the backend allows it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from craft_ray.backends import check_backend, run_backend
from craft_ray.config import ConfigError
from craft_ray.models.gguf import resolve_model_path
from craft_ray.models.tokenizers import load_chat_tokenizer, local_ref
from craft_ray.runtime import StageDir, StageStats, storage
from craft_ray.runtime.progress import report_progress
from craft_ray.stages.generate.actors import PromptBuilder
from craft_ray.stages.generate.config import GenerateConfig, GenerateStageConfig
from craft_ray.stages.generate.parse import parse_batch, split_outputs
from craft_ray.stages.generate.prompts import PromptSettings, ShotPool, make_shot_pool
from craft_ray.tasks.base import TaskError
from craft_ray.tasks.fewshots import FewShotError

logger = logging.getLogger(__name__)


# --- the lazy plans ---------------------------------------------------------------------


def prompts_dataset(docs: Any, cfg: GenerateConfig, settings: PromptSettings, pool: ShotPool
                    ) -> Any:
    """Lazy: corpus-sample rows -> prompt rows."""
    import ray.data

    return docs.map_batches(
        PromptBuilder, batch_size=cfg.prompt_batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.prompt_concurrency), num_cpus=1,
        fn_constructor_kwargs={"task_spec": _task_spec(cfg), "pool": pool,
                               "settings": settings,
                               "tokenizer": local_ref(cfg.tokenizer_name())},
    )


def generations_dataset(prompts: Any, cfg: GenerateConfig) -> Any:
    """Lazy: prompt rows (kept ones) -> backend -> parsed generation rows."""
    from ray.data.expressions import col

    kept = prompts.filter(expr=col("drop_reason") == "")  # dropped prompts are not generated
    gen = backend_dataset(kept, cfg)
    return gen.map_batches(parse_batch, batch_format="pyarrow", batch_size=256, num_cpus=0.25,
                           fn_kwargs={"task_spec": _task_spec(cfg)})


def backend_dataset(kept: Any, cfg: GenerateConfig, sampling: dict[str, Any] | None = None
                    ) -> Any:
    """Lazy: prompt rows -> the configured backend -> generation columns.

    ``sampling`` overrides :meth:`GenerateConfig.sampling` (the strategies use it for their
    greedy steps)."""
    model = cfg.model if cfg.backend == "openai" else local_ref(cfg.model) or cfg.model
    return run_backend(kept, cfg.backend, model, getattr(cfg, cfg.backend),
                       sampling or cfg.sampling(), tokenizer=local_ref(cfg.tokenizer),
                       key=f"generate.{cfg.backend}")


def _task_spec(cfg: GenerateConfig) -> Any:
    return cfg.task if isinstance(cfg.task, str) else cfg.task.model_dump(mode="json")

# --- stage runner -------------------------------------------------------------------------


def _model_context(name: str) -> int | None:
    """The generator's context length from its config (None when unknown)."""
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(resolve_model_path(name))
    except Exception:  # not a local/hub model (e.g. an openai served name)
        return None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def prompt_budget(cfg: GenerateConfig, max_new_tokens: int) -> int | None:
    """max_prompt_tokens, or the model's context minus max_new_tokens, or None."""
    if cfg.max_prompt_tokens is not None:
        return cfg.max_prompt_tokens
    ctx = None
    if cfg.backend == "vllm" and cfg.vllm.max_model_len:
        ctx = cfg.vllm.max_model_len
    if ctx is None and cfg.tokenizer_name() is not None:
        ctx = _model_context(cfg.model if cfg.backend != "openai" else cfg.tokenizer_name())
    if ctx is None:
        return None
    if ctx <= max_new_tokens:
        raise ConfigError(
            f"generate.max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
            f"model's context of {ctx} tokens; lower max_new_tokens"
        )
    return ctx - max_new_tokens


def input_path_of(stage_cfg: GenerateStageConfig) -> str:
    """The corpus samples to read (a clear error when missing)."""
    cfg = stage_cfg.generate
    p = cfg.input_path or storage.join(stage_cfg.run_dir, "retrieve", "corpus_samples.parquet")
    if not storage.exists(p):
        raise ConfigError(
            f"corpus samples {storage.redact(p)} do not exist: run `craft-ray retrieve` first, "
            "or set generate.input_path to a Parquet/JSONL file with doc_id and text"
        )
    return p


def _read_docs(path: str, limit: int | None) -> Any:
    import pyarrow.parquet as pq
    import ray.data

    fs, where = storage.filesystem(path)
    if path.endswith((".jsonl", ".json")):
        ds = ray.data.read_json(where, filesystem=fs, lines=True)
        names = ds.schema().names
    else:
        names = pq.read_schema(where, filesystem=fs).names if storage.is_file(path) else None
        ds = ray.data.read_parquet(where, filesystem=fs)
        names = names or ds.schema().names
    missing = [c for c in ("doc_id", "text") if c not in names]
    if missing:
        raise ConfigError(f"corpus samples {path} lack column(s) {missing} (has {names})")
    keep = [c for c in ("doc_id", "corpus", "text", "fewshot_ids") if c in names]
    ds = ds.select_columns(keep)
    return ds.limit(limit) if limit else ds


@dataclass
class _Plan:
    """What run_generate checked before any work: task, few-shots, input, token budgets."""

    task: Any
    pool: ShotPool
    input_path: str
    max_new: int
    budget: Any
    settings: PromptSettings


def _plan(stage_cfg: GenerateStageConfig) -> _Plan:
    """Everything that can be wrong with the inputs, checked before any work starts."""
    cfg = stage_cfg.generate
    task = cfg.task_obj()
    try:
        pool = make_shot_pool(task, cfg.fewshots, cfg.fewshot_text_max_chars)
    except FewShotError as exc:
        raise ConfigError(f"generate.fewshots: {exc}") from None
    except TaskError as exc:
        raise ConfigError(f"generate.task: {exc}") from None
    if cfg.num_shots > len(pool.ids):
        raise ConfigError(
            f"generate.num_shots={cfg.num_shots} but {cfg.fewshots.path} holds only "
            f"{len(pool.ids)} few-shots; lower num_shots"
        )
    if cfg.backend == "openai" and cfg.openai.api_key_env and not os.environ.get(
            cfg.openai.api_key_env):
        raise ConfigError(
            f"generate.openai.api_key_env names {cfg.openai.api_key_env!r}, which is not set; "
            "export it, or set api_key_env: null for a server without a key"
        )
    input_path = input_path_of(stage_cfg)
    check_backend(cfg.backend, cfg.model, cfg.openai, "generate")
    max_new = cfg.max_new_tokens or task.max_new_tokens
    load_chat_tokenizer(cfg.tokenizer_name())  # fails early on a tokenizer without chat template
    budget = prompt_budget(cfg, max_new)
    settings = PromptSettings(
        task_name=task.name, num_shots=cfg.num_shots, samples_per_doc=cfg.samples_per_doc,
        seed=cfg.seed, max_new_tokens=max_new, max_prompt_tokens=budget,
        long_prompt=cfg.long_prompt, min_text_tokens=cfg.min_text_tokens,
        guided_max_string_chars=cfg.guided_max_string_chars if cfg.guided_decoding else None,
    )
    return _Plan(task, pool, input_path, max_new, budget, settings)


def _write_prompts(docs: Any, cfg: GenerateConfig, plan: _Plan, prompts_dir: str
                   ) -> tuple[Any, Any, int, int, float]:
    """Prompts to Parquet; (prompts dataset, dropped prompts table, prompts, prompts whose
    text was truncated, seconds)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds
    import ray.data

    fs, where = storage.filesystem(prompts_dir)
    t0 = time.time()
    prompts_dataset(docs, cfg, plan.settings, plan.pool).write_parquet(where, filesystem=fs)
    prompt_seconds = time.time() - t0
    prompts = ray.data.read_parquet(where, filesystem=fs)
    prompt_cols = ["sample_id", "doc_id", "corpus", "fewshot_ids", "prompt_tokens",
                   "drop_reason", "drop_detail"]
    prompt_table = pds.dataset(where, filesystem=fs).to_table(columns=prompt_cols)
    drops = prompt_table.filter(pc.not_equal(prompt_table.column("drop_reason"), ""))
    n_truncated = pds.dataset(where, filesystem=fs).to_table(
        columns=["text_truncated"]).column("text_truncated").to_pylist().count(True)
    return prompts, drops, prompt_table.num_rows, n_truncated, prompt_seconds


def _write_outputs(stage: StageDir, out: dict[str, Any], drops: Any) -> None:
    """raw/clean/rejects Parquet, clean.jsonl and the prompt drops, each written atomically."""
    for name, table in out.items():
        storage.write_parquet(stage.file(f"{name}.parquet"), table)
    storage.write_text(stage.file("clean.jsonl"), "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in out["clean"].to_pylist()))
    storage.write_parquet(stage.file("prompt_drops.parquet"), drops)


def _check_accounting(n_prompts: int, raw_n: int, n_drops: int, clean_n: int,
                      n_rejects: int) -> None:
    """Nothing lost: every prompt is a generation or a drop; every generation clean or reject."""
    if n_prompts != raw_n + n_drops or raw_n != clean_n + n_rejects:
        raise RuntimeError(
            f"generate: row accounting broken: prompts={n_prompts} raw={raw_n} "
            f"drops={n_drops} clean={clean_n} rejects={n_rejects}"
        )


def _check_error_rate(cfg: GenerateConfig, backend_errors: int, raw_n: int,
                      stage: StageDir) -> None:
    if raw_n and backend_errors / raw_n > cfg.max_error_rate:
        raise RuntimeError(
            f"generate: {backend_errors} of {raw_n} generations failed in the backend "
            f"({backend_errors / raw_n:.1%} > max_error_rate={cfg.max_error_rate}); see "
            f"{storage.redact(stage.file('rejects.parquet'))}. Fix the backend or raise "
            "generate.max_error_rate."
        )


def _generate(prompts: Any, cfg: GenerateConfig, n_live: int, gens_dir: str
              ) -> tuple[list[dict[str, Any]], float]:
    """Generations of the ``n_live`` prompts not dropped, through Parquet in ``gens_dir``;
    (rows, seconds)."""
    import pyarrow.dataset as pds

    t1 = time.time()
    rows: list[dict[str, Any]] = []
    if n_live > 0:
        report_progress(total=n_live, unit="generations")
        fs, where = storage.filesystem(gens_dir)
        generations_dataset(prompts, cfg).write_parquet(where, filesystem=fs)
        rows = pds.dataset(where, filesystem=fs).to_table().to_pylist()
    return rows, time.time() - t1


def _timings(prompt_seconds: float, gen_seconds: float, clean_n: int, tokens_out: int
             ) -> dict[str, Any]:
    """The stage's seconds and generation throughput, for its stats."""
    return {
        "prompt_seconds": round(prompt_seconds, 3),
        "generation_seconds": round(gen_seconds, 3),
        "samples_per_s": round(clean_n / gen_seconds, 4) if gen_seconds > 0 else None,
        "tokens_out_per_s": round(tokens_out / gen_seconds, 2) if gen_seconds > 0 else None,
    }


def run_generate(stage_cfg: GenerateStageConfig, *, force: bool = False) -> dict[str, Any]:
    """Run the generation stage (Ray must be initialised). Returns the stage's stats."""
    cfg = stage_cfg.generate
    stage = StageDir(stage_cfg.run_dir, "generate")
    if not force and stage.is_complete(cfg):
        logger.info("generate: already complete in %s (same config); skipping",
                    storage.redact(stage.location))
        return stage.read_stats()
    if cfg.strategy != "craft":  # issue 17: the other seed methods' strategies
        from craft_ray.stages.generate.strategies import run_strategy

        return run_strategy(stage_cfg, stage)
    plan = _plan(stage_cfg)
    task = plan.task
    logger.info("generate: task=%s backend=%s model=%s max_new_tokens=%d prompt budget=%s",
                task.name, cfg.backend, cfg.model, plan.max_new, plan.budget)

    stage.begin(cfg, clean=True)
    stats = StageStats("generate")
    docs = _read_docs(plan.input_path, cfg.limit)
    prompts, drops, n_prompts, n_truncated, prompt_seconds = _write_prompts(
        docs, cfg, plan, stage.file("prompts"))

    gens_dir = stage.file("generations")
    rows, gen_seconds = _generate(prompts, cfg, n_prompts - drops.num_rows, gens_dir)
    out = split_outputs(rows, task)
    raw_n, clean_n = out["raw"].num_rows, out["clean"].num_rows
    reject_reasons = Counter(out["rejects"].column("reject_reason").to_pylist())
    tokens_in = sum(max(0, r["tokens_in"]) for r in rows)
    tokens_out = sum(max(0, r["tokens_out"]) for r in rows)
    backend_errors = sum(1 for r in rows if r["error"])
    _write_outputs(stage, out, drops)
    drop_reasons = Counter(drops.column("drop_reason").to_pylist())
    _check_accounting(n_prompts, raw_n, drops.num_rows, clean_n, sum(reject_reasons.values()))
    stats.rows_in = n_prompts
    stats.rows_out = clean_n
    stats.rejects = reject_reasons + drop_reasons
    stats.extra = {
        "task": task.name, "backend": cfg.backend, "model": cfg.model,
        "output_dir": storage.redact(stage.location),
        "documents": n_prompts // cfg.samples_per_doc,
        "prompts": n_prompts, "prompt_drops": dict(sorted(drop_reasons.items())),
        "prompts_text_truncated": n_truncated, "prompt_budget_tokens": plan.budget,
        "generations": raw_n, "samples": clean_n,
        "generation_rejects": dict(sorted(reject_reasons.items())),
        "backend_errors": backend_errors,
        "yield": round(clean_n / raw_n, 4) if raw_n else None,
        "tokens_in": tokens_in, "tokens_out": tokens_out,
        **_timings(prompt_seconds, gen_seconds, clean_n, tokens_out),
        "fewshots": len(plan.pool.ids), "fewshot_quirks": plan.pool.quirks,
        "max_new_tokens": plan.max_new, "guided_decoding": cfg.guided_decoding,
    }
    _check_error_rate(cfg, backend_errors, raw_n, stage)
    storage.remove(gens_dir)  # raw.parquet holds the same rows
    return stage.finish(cfg, stats)
