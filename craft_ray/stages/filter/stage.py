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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_ray.backends import check_backend
from craft_ray.runtime import StageDir, StageStats, storage
from craft_ray.stages.filter.actors import judge_dataset
from craft_ray.stages.filter.config import (
    FilterConfig,
    FilterError,
    FilterStageConfig,
    read_stage_config,
)
from craft_ray.stages.filter.decontam import decontam_step, leakage_batch, load_decontam_set
from craft_ray.stages.filter.dedup_dataset import (
    exact_duplicates_dataset,
    fuzzy_duplicates_dataset,
    semantic_duplicates_dataset,
)
from craft_ray.stages.filter.output import build_datasets
from craft_ray.stages.filter.quality import judge_criteria, resolve_judge
from craft_ray.stages.filter.rows import (
    REJECT_COLUMNS,
    init_rejects_batch,
    mark_dedup,
    rejected_of,
    step_counts,
    survivors_of,
)
from craft_ray.tasks.fewshots import FewShotConfig, load_fewshots

logger = logging.getLogger(__name__)


def resolve_input(cfg: FilterConfig, run_dir: str | Path) -> str:
    """The clean-samples path; a missing one is a :class:`FilterError` naming the fix."""
    p = cfg.input or storage.join(run_dir, "generate", "clean.parquet")
    if not storage.exists(p):
        raise FilterError(f"clean samples {storage.redact(p)} do not exist: run `craft-ray "
                          "generate` first or set filter.input to a Parquet file/folder of "
                          "clean samples")
    return p


def resolve_task(cfg: FilterConfig, run_dir: str | Path, input_path: str) -> Any:
    """The task from the config, else the generate stage's config, else the task column."""
    from craft_ray.tasks.registry import get_task

    spec: Any = cfg.task
    if spec is None:
        spec = read_stage_config(run_dir, "generate").get("task")
    if spec is None:

        names = set(_parquet_dataset(input_path).read(columns=["task"])
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
    gen = read_stage_config(run_dir, "generate")
    raw = gen.get("fewshots")
    if isinstance(raw, dict):
        return FewShotConfig.model_validate(raw)
    return None


def _parquet_dataset(path: str) -> Any:
    """A ``pyarrow.parquet.ParquetDataset`` of a file or folder, local or on an object store."""
    import pyarrow.parquet as pq

    fs, where = storage.filesystem(path)
    return pq.ParquetDataset(where, filesystem=fs)


def _input_columns(path: str) -> list[str]:
    return list(_parquet_dataset(path).schema.names)


def check_input_columns(path: str, record_fields: Sequence[str]) -> list[str]:
    """The input's columns; missing required ones are a :class:`FilterError`."""
    cols = _input_columns(path)
    need = ["sample_id", "sample_text", *record_fields]
    missing = [c for c in need if c not in cols]
    if missing:
        raise FilterError(f"{path} lacks column(s) {missing} (has {cols}); the filter stage "
                          "reads generate's clean samples: the task's record fields plus "
                          "sample_id and sample_text")
    return cols


@dataclass
class _Inputs:
    """Everything run_filter checks before any work: input, task, few-shots, eval sets."""

    path: str
    task: Any
    columns: list[str]
    shots: list[Any]
    fs_records: list[dict[str, Any]]
    fs_texts: list[str]
    eval_texts: dict[str, list[str]]


def _check_inputs(cfg: FilterConfig, run_dir: str) -> _Inputs:
    """Input columns, task, few-shots, eval sets and sizes, checked before any work starts."""
    from craft_ray.tasks.base import TaskError
    from craft_ray.tasks.fewshots import FewShotError

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
        eval_texts = {e.name: load_decontam_set(e) for e in cfg.decontamination.eval_sets}
        if not eval_texts:
            logger.warning("filter: decontamination enabled but no eval_sets configured; "
                           "skipping it")
    if cfg.judge.enabled:
        judge = resolve_judge(cfg.judge, run_dir)
        check_backend(judge["backend"], judge["model"], judge["settings"], "filter.judge")
    return _Inputs(input_path, task, cols, shots, fs_records, fs_texts, eval_texts)


def _mark_rejects(ds: Any, cfg: FilterConfig, inp: _Inputs, decontam_report: dict[str, Any]
                  ) -> tuple[Any, list[str], dict[str, float]]:
    """Every step before the judge marks its rejects in place; (dataset, steps run, seconds)."""
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
        ds = timed("exact_dedup", lambda x: mark_dedup(
            x, lambda y: exact_duplicates_dataset(y, d.shuffle_partitions),
            "exact_dedup", "exact_duplicate"), ds, materialize=False)
    if cfg.leakage.enabled and inp.fs_texts:
        ds = timed("fewshot_leakage", lambda x: x.map_batches(
            leakage_batch, batch_size=cfg.leakage.batch_size, batch_format="pyarrow",
            fn_kwargs={"fewshot_texts": inp.fs_texts, "fewshot_ids": [s.id for s in inp.shots],
                       "threshold": cfg.leakage.threshold}), ds, materialize=False)
    if inp.eval_texts:
        ds = timed("decontamination", lambda x: decontam_step(
            x, cfg.decontamination, inp.eval_texts, decontam_report), ds, materialize=False)
    else:
        ds = ds.materialize()
    if d.fuzzy.enabled:
        ds = timed("fuzzy_dedup", lambda x: mark_dedup(
            x, lambda y: fuzzy_duplicates_dataset(y, d.fuzzy, d.shuffle_partitions),
            "fuzzy_dedup", "near_duplicate"), ds, materialize=False)
    if d.semantic.enabled:
        ds = timed("semantic_dedup", lambda x: mark_dedup(
            x, lambda y: semantic_duplicates_dataset(y, d.semantic, d.shuffle_partitions),
            "semantic_dedup", "semantic_duplicate"), ds, materialize=False)
    if "_decontam" in ds.columns():
        ds = ds.drop_columns(["_decontam"])
    return ds.materialize(), order, seconds


def _judge_step(survivors: Any, cfg: FilterConfig, run_dir: str, task: Any, stage: StageDir,
                stats: StageStats, steps: list[dict[str, Any]]) -> Any:
    """The judge, last and costliest: it sees only the survivors; its rejects (with their
    scores) go to their own folder. Returns the survivors of the judge."""
    t0 = time.time()
    judged = judge_dataset(survivors, cfg.judge, run_dir, task).materialize()
    jstep = step_counts(judged, judged.count(), ["judge"])[0]
    jstep["seconds"] = round(time.time() - t0, 3)
    stats.rejects.update(jstep["reasons"])
    steps.append(jstep)
    logger.info("filter/judge: %d -> %d (%d dropped)", jstep["rows_in"],
                jstep["rows_out"], jstep["dropped"])
    if jstep["dropped"]:
        _write_ray_parquet(rejected_of(judged), stage.file("judge_rejects"))
    return survivors_of(judged)


def _count_steps(ds: Any, stats: StageStats, order: list[str], seconds: dict[str, float],
                 stage: StageDir) -> list[dict[str, Any]]:
    """Rows in/out and reasons per step (into stats); the rejects written beside."""
    steps = step_counts(ds, stats.rows_in, order)
    for st in steps:
        st["seconds"] = seconds.get(st["step"])
        stats.rejects.update(st["reasons"])
        logger.info("filter/%s: %d -> %d (%d dropped)", st["step"], st["rows_in"],
                    st["rows_out"], st["dropped"])
    if sum(st["dropped"] for st in steps):
        _write_ray_parquet(rejected_of(ds), stage.file("rejects"))
    return steps


def _write_datasets(survivors: Any, inp: _Inputs, cfg: FilterConfig, stage: StageDir,
                    run_dir: str, steps: list[dict[str, Any]], stats: StageStats,
                    decontam_report: dict[str, Any]) -> None:
    """The sized datasets, the decontamination report and the stage's extra stats."""
    built, skipped = build_datasets(survivors, inp.task, inp.shots, inp.fs_records, cfg,
                                    stage.location, run_dir, steps, inp.eval_texts,
                                    _survivor_schema(inp.path, inp.task, cfg))
    decontam_report["datasets"] = {name: info.get("decontamination", {})
                                   for name, info in built.items()}
    storage.write_json(stage.file("decontamination.json"), decontam_report)
    stats.extra = {
        "task": inp.task.name, "input": storage.redact(inp.path), "input_columns": inp.columns,
        "fewshots": len(inp.shots), "steps": steps,
        "steps_seconds_note": "per-row steps (leakage, decontamination marks) run fused into "
                              "the next global step, so their time is counted there",
        "datasets": {k: {kk: vv for kk, vv in v.items() if kk != "decontamination"}
                     for k, v in built.items()},
        "sizes_skipped": skipped,
        "decontamination": {k: v for k, v in decontam_report.items() if k != "datasets"},
    }
    if skipped:
        logger.warning("filter: %s", too_few_message(skipped, built))


def run_filter(stage_cfg: FilterStageConfig, *, force: bool = False) -> dict[str, Any]:
    """Run the filter stage (Ray must be initialised); returns the stage's stats.

    Everything that can be checked (input columns, task, few-shots, eval sets, sizes against
    the number of few-shots) is checked before any work starts. Rows are marked in place by
    each step (``reject_step`` etc.); a step only looks at rows no earlier step rejected.
    """
    import ray.data

    cfg = stage_cfg.filter
    run_dir = stage_cfg.run_dir
    stage = StageDir(run_dir, "filter")
    if not force and stage.is_complete(cfg):
        logger.info("filter: already complete in %s (same config); skipping",
                    storage.redact(stage.location))
        return stage.read_stats()
    inp = _check_inputs(cfg, run_dir)

    stage.begin(cfg, clean=True)
    stats = StageStats("filter")
    fs, where = storage.filesystem(inp.path)
    ds = ray.data.read_parquet(where, filesystem=fs).map_batches(
        init_rejects_batch, batch_format="pyarrow").materialize()
    stats.rows_in = ds.count()
    logger.info("filter: %d clean samples of task %s from %s", stats.rows_in, inp.task.name,
                inp.path)
    decontam_report: dict[str, Any] = {"enabled": bool(inp.eval_texts)}
    if stats.rows_in == 0:
        # Nothing to filter (every generation was rejected): the shuffles of the dedup steps
        # cannot run on zero rows, and no step has anything to drop.
        logger.warning("filter: %s holds no clean samples (see the generate stage's "
                       "rejects.parquet for why); the outputs will be empty", inp.path)
        order, seconds = [], {}
    else:
        ds, order, seconds = _mark_rejects(ds, cfg, inp, decontam_report)
    steps = _count_steps(ds, stats, order, seconds, stage)
    survivors = survivors_of(ds)
    if cfg.judge.enabled:
        survivors = _judge_step(survivors, cfg, run_dir, inp.task, stage, stats, steps)
    survivors = survivors.drop_columns(list(REJECT_COLUMNS)).materialize()
    _write_ray_parquet(survivors, stage.file("survivors"))
    stats.rows_out = survivors.count()
    _write_datasets(survivors, inp, cfg, stage, run_dir, steps, stats, decontam_report)
    return stage.finish(cfg, stats)


def _write_ray_parquet(ds: Any, location: str) -> None:
    """A Ray dataset to a Parquet folder, local or on an object store."""
    fs, where = storage.filesystem(location)
    ds.write_parquet(where, filesystem=fs)


def _survivor_schema(input_path: str, task: Any, cfg: FilterConfig) -> Any:
    import pyarrow as pa

    schema = _parquet_dataset(input_path).schema
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
