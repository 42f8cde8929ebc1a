"""Generation strategies besides CRAFT's one-sample-per-document (``generate.strategy``).

- ``cst`` (:mod:`.cst`): AugCon's Context-Split-Tree, questions at every granularity.
- ``multihop`` (:mod:`.multihop`): qa-expert's multi-hop items over neighbouring documents.
- ``rag_answer`` (:mod:`.rag_answer`): Instruction-FineTuning's RAG answers over noisy chunks.

Each runs over the same backends, guided decoding, parse-validate-reject contract and
provenance as ``craft`` (:mod:`.common`), and writes the same stage outputs:
``RUN_DIR/generate/clean.parquet`` + ``clean.jsonl`` (records in the strategy's layout,
:mod:`craft_ray.tasks.strategies`, plus ``sample_id``, ``task`` = the strategy, ``doc_id``,
``corpus``, ``fewshot_ids``, ``retrieved_by``, ``prompt_hash``, ``sample_text``),
``rejects.parquet``
(``step``, ``reject_reason``, ``reject_detail``), ``steps/STEP.parquet`` (every prompt and
output of each step), ``stats.json``. Invariant checked before ``_SUCCESS``: every candidate
item is clean or a reject. Downstream stages read the records with ``task: <strategy>``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from craft_ray.config import ConfigError
from craft_ray.runtime import storage

logger = logging.getLogger(__name__)

STRATEGIES = ("craft", "cst", "multihop", "rag_answer")


def run_strategy(stage_cfg: Any, stage: Any) -> dict[str, Any]:
    """Run ``generate.strategy`` (not ``craft``) into ``stage`` (a StageDir); returns stats."""
    from craft_ray.models.tokenizers import load_chat_tokenizer, local_ref
    from craft_ray.runtime import StageStats
    from craft_ray.stages.generate.stage import input_path_of, prompt_budget
    from craft_ray.stages.generate.strategies.common import StepContext, read_docs, write_outputs
    from craft_ray.tasks import get_task
    from craft_ray.tasks.fewshots import FewShotError, load_fewshots

    cfg = stage_cfg.generate
    name = cfg.strategy
    stage_path = stage.location  # a local path or an object-store URI
    try:
        shots = load_fewshots(cfg.fewshots)
    except FewShotError as exc:
        raise ConfigError(f"generate.fewshots: {exc}") from None
    if cfg.num_shots > len(shots):
        raise ConfigError(f"generate.num_shots={cfg.num_shots} but {cfg.fewshots.path} holds "
                          f"only {len(shots)} few-shots; lower num_shots")
    input_path = input_path_of(stage_cfg)
    tokenizer = load_chat_tokenizer(local_ref(cfg.tokenizer_name()))
    task = get_task(name)
    budget = prompt_budget(cfg, cfg.max_new_tokens or task.max_new_tokens)
    stage.begin(cfg, clean=True)
    stats = StageStats("generate")
    ctx = StepContext(cfg=cfg, tokenizer=tokenizer, budget=budget, stage_path=stage_path,
                      shots=shots, seed=cfg.seed, sampling=cfg.sampling(),
                      guided_cap=cfg.guided_max_string_chars if cfg.guided_decoding else None)
    docs = read_docs(input_path, cfg.limit)
    logger.info("generate: strategy=%s over %d documents, backend=%s model=%s", name,
                len(docs), cfg.backend, cfg.model)
    t0 = time.time()
    if name == "cst":
        from craft_ray.stages.generate.strategies.cst import record_types, run_cst

        items, extra = run_cst(ctx, docs, cfg.cst)
    elif name == "multihop":
        from craft_ray.stages.generate.strategies.multihop import record_types, run_multihop

        items, extra = run_multihop(ctx, docs, cfg.multihop, stage_cfg.run_dir)
    else:
        from craft_ray.stages.generate.strategies.rag_answer import record_types, run_rag_answer

        items, extra = run_rag_answer(ctx, docs, cfg.rag_answer, stage_cfg.run_dir)
    counts = write_outputs(stage_path, task, items, name, record_types)
    if counts["items"] != counts["clean"] + sum(counts["rejects"].values()):
        raise RuntimeError(f"generate[{name}]: row accounting broken: {counts}")
    stats.rows_in = counts["items"]
    stats.rows_out = counts["clean"]
    stats.rejects = counts["rejects"]
    stats.extra = {"strategy": name, "task": name, "backend": cfg.backend, "model": cfg.model,
                   "output_dir": storage.redact(stage_path), "documents_in": len(docs),
                   "items": counts["items"], "samples": counts["clean"],
                   "yield": round(counts["clean"] / counts["items"], 4) if counts["items"]
                   else None, "generation_seconds": round(time.time() - t0, 3),
                   "steps": ctx.step_stats, "guided_decoding": cfg.guided_decoding,
                   "prompt_budget_tokens": budget, **extra}
    return stage.finish(cfg, stats)
