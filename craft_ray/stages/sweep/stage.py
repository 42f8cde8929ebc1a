"""Seed x dataset-size sweeps on Ray Tune; each trial is one Ray Train fine-tune.

Pattern of Ray 2.60 for Tune around Train V2 (a ``Tuner`` no longer takes a trainer object):
the Tune function :func:`sweep_trial` builds the ``TorchTrainer`` through
:func:`craft_ray.stages.train.run_train`, calls ``fit()``, and Train's metrics reach Tune through
``ray.tune.integration.ray_train.TuneReportCallback``.

Resume: every trial writes ``RUN_DIR/train/{size}-seed{seed}/`` with ``_SUCCESS`` last. A rerun
of the sweep starts a fresh Tuner over the same grid; a trial whose folder is complete (same
config) reports its stored result without training, an unfinished one resumes from its last Ray
Train checkpoint. So a killed sweep loses at most the steps since each running trial's last
checkpoint, and finished trials are never rerun.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from craft_ray.config import ConfigError
from craft_ray.runtime import StageDir, StageStats, storage
from craft_ray.stages.sweep.config import SweepStageConfig
from craft_ray.stages.train import TrainConfig, TrainStageConfig, check_resources, run_train

logger = logging.getLogger(__name__)


TABLE_METRICS = ("eval_loss", "train_loss")


def trial_stage_config(stage: SweepStageConfig, size: str, seed: int) -> TrainStageConfig:
    """The train config of one grid point (``{size}`` in paths is filled in)."""
    data = stage.train.model_dump(mode="json")
    data.update(seed=seed, dataset_size=size, trial_name=None)
    if data.get("dataset_path"):
        data["dataset_path"] = data["dataset_path"].replace("{size}", size)
    return TrainStageConfig(run_dir=stage.run_dir, ray=stage.ray,
                            train=TrainConfig.model_validate(data))


def sweep_trial(config: dict[str, Any]) -> None:
    """Tune function: one fine-tune (TorchTrainer.fit inside run_train), then its result."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    stage = SweepStageConfig.model_validate(config["stage"])
    tcfg = trial_stage_config(stage, config["size"], int(config["seed"]))
    stats = run_train(tcfg, callbacks=[TuneReportCallback()])
    ray.tune.report({"size": config["size"], "seed": int(config["seed"]),
                     "trial": tcfg.train.name(), "adapter": stats.get("adapter"),
                     "skipped": bool(stats.get("skipped", False)),
                     "finished": bool(stats.get("finished", False)),
                     **{m: stats.get(m) for m in TABLE_METRICS}, "done": True})


def default_concurrency(cfg: TrainConfig) -> int:
    """Trials that fit at once on the connected cluster."""
    import ray

    res = ray.cluster_resources()
    if cfg.use_gpu:
        return max(1, int(res.get("GPU", 0) // cfg.num_workers))
    if cfg.cpus_per_worker is None:  # each trial's workers take the machine (actor_cpus)
        return 1
    return max(1, int(res.get("CPU", 1) // (cfg.num_workers * cfg.cpus_per_worker)))


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def build_table(rows: list[dict[str, Any]], sizes: list[str]) -> list[dict[str, Any]]:
    """Per size: mean and sample std across seeds of each metric, and where the adapters are."""
    table = []
    for size in sizes:
        mine = [r for r in rows if r["size"] == size]
        ok = [r for r in mine if r["status"] == "finished"]
        entry: dict[str, Any] = {"size": size, "seeds": [r["seed"] for r in ok],
                                 "n": len(ok), "failed": len(mine) - len(ok),
                                 "adapters": {str(r["seed"]): r["adapter"] for r in ok}}
        for m in TABLE_METRICS:
            vals = [float(r[m]) for r in ok if r.get(m) is not None]
            mean, std = _mean_std(vals) if vals else (None, None)
            entry[m] = {"mean": mean, "std": std, "n": len(vals)}
        table.append(entry)
    return table


def format_table(table: list[dict[str, Any]]) -> str:
    """Markdown: one line per size, ``mean ± std (n)`` per metric, adapter folders."""

    def cell(d: dict[str, Any]) -> str:
        return "-" if d["mean"] is None else f"{d['mean']:.4f} ± {d['std']:.4f} (n={d['n']})"

    lines = ["| size | " + " | ".join(TABLE_METRICS) + " | seeds | failed | adapters |",
             "|" + "---|" * (len(TABLE_METRICS) + 4)]
    for e in table:
        adapters = "<br>".join(f"{s}: {p}" for s, p in e["adapters"].items()) or "-"
        lines.append(f"| {e['size']} | " + " | ".join(cell(e[m]) for m in TABLE_METRICS)
                     + f" | {', '.join(map(str, e['seeds'])) or '-'} | {e['failed']} | "
                     f"{adapters} |")
    return "\n".join(lines) + "\n"


def _trial_rows(stage_cfg: SweepStageConfig, errors: dict[tuple[str, int], str]
                ) -> list[dict[str, Any]]:
    """One row per grid point, read from the trial folders (the source of truth)."""
    rows = []
    for size in stage_cfg.sweep.sizes:
        for seed in stage_cfg.sweep.seeds:
            tcfg = trial_stage_config(stage_cfg, size, seed)
            tdir = StageDir(storage.join(tcfg.run_dir, "train"), tcfg.train.name())
            done = tdir.is_complete(tcfg.train)
            row: dict[str, Any] = {"size": size, "seed": seed, "trial": tcfg.train.name(),
                                   "status": "finished" if done else "failed",
                                   "adapter": None, "error": errors.get((size, seed))}
            if done:
                st = tdir.read_stats()
                row.update(adapter=st.get("adapter"), steps=st.get("steps"),
                           **{m: st.get(m) for m in TABLE_METRICS})
            rows.append(row)
    return rows


def run_sweep(stage_cfg: SweepStageConfig,
              trial_fn: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the seed x size grid on Ray Tune; write results and the table.

    ``trial_fn`` replaces :func:`sweep_trial` as the Tune function (it gets the same config:
    ``stage``, ``size``, ``seed``; it must be importable by the Ray workers and should end by
    calling ``sweep_trial`` or reporting the same keys). A trial that raises is retried up to
    ``sweep.max_failures`` times; one that still fails is listed as failed in the table.
    """
    cfg = stage_cfg.sweep
    check_resources(stage_cfg.train)
    _check_datasets(stage_cfg)
    stage = StageDir(stage_cfg.run_dir, "sweep")
    stage.begin(stage_cfg)
    stats = StageStats("sweep")
    n_trials = len(cfg.sizes) * len(cfg.seeds)
    grid = _build_tuner(stage_cfg, stage, trial_fn, n_trials).fit()
    errors, skipped = _grid_outcomes(grid)
    rows = _trial_rows(stage_cfg, errors)
    table = build_table(rows, cfg.sizes)
    storage.write_text(stage.file("results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    storage.write_json(stage.file("table.json"), table)
    storage.write_text(stage.file("table.md"), format_table(table))
    failed = [r for r in rows if r["status"] != "finished"]
    stats.rows_in = n_trials
    stats.rows_out = n_trials - len(failed)
    stats.rejects.update({"failed_trial": len(failed)} if failed else {})
    stats.extra.update({"trials_skipped_as_complete": skipped,
                        "trials_run": n_trials - skipped - len(failed),
                        "table": storage.redact(stage.file("table.md")),
                        "experiment": str(grid.experiment_path)})
    logger.info("sweep table (%s):\n%s", storage.redact(stage.file("table.md")),
                format_table(table))
    if failed:
        data = stats.finish()
        storage.write_json(stage.file("stats.json"), data)
        logger.error("sweep: %d of %d trials failed (%s); rerun to retry them", len(failed),
                     n_trials, ", ".join(r["trial"] for r in failed))
        return data
    return stage.finish(stage_cfg, stats)


def _check_datasets(stage_cfg: SweepStageConfig) -> None:
    """Every size's dataset must exist before any trial starts."""
    from craft_ray.stages.train import dataset_path

    for size in stage_cfg.sweep.sizes:
        tcfg = trial_stage_config(stage_cfg, size, stage_cfg.sweep.seeds[0])
        if not storage.exists(dataset_path(tcfg)):
            raise ConfigError(f"sweep: dataset of size {size} not found at "
                              f"{dataset_path(tcfg)}; run `craft-ray filter` or drop {size} "
                              "from sweep.sizes (train.dataset_path may contain {size})")


def _build_tuner(stage_cfg: SweepStageConfig, stage: StageDir,
                 trial_fn: Callable[[dict[str, Any]], None] | None, n_trials: int) -> Any:
    """The Ray Tune grid of sizes x seeds, its experiment under ``sweep/tune/``."""
    import ray.tune

    cfg = stage_cfg.sweep
    fs, storage_path = storage.ray_storage(stage.file("tune"))
    concurrency = cfg.max_concurrent_trials or default_concurrency(stage_cfg.train)
    logger.info("sweep: %d trials (%d sizes x %d seeds), up to %d at once", n_trials,
                len(cfg.sizes), len(cfg.seeds), concurrency)
    return ray.tune.Tuner(
        ray.tune.with_resources(trial_fn or sweep_trial, {"cpu": cfg.trial_cpus}),
        param_space={"stage": stage_cfg.model_dump(mode="json"),
                     "size": ray.tune.grid_search(cfg.sizes),
                     "seed": ray.tune.grid_search(cfg.seeds)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency),
        run_config=ray.tune.RunConfig(
            name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.tune.FailureConfig(max_failures=cfg.max_failures),
            verbose=cfg.verbose),
    )


def _grid_outcomes(grid: Any) -> tuple[dict[tuple[str, int], str], int]:
    """The errors of the trials that failed (by size and seed) and how many were skipped as
    already complete."""
    errors: dict[tuple[str, int], str] = {}
    skipped = 0
    for res in grid:
        size, seed = res.config["size"], int(res.config["seed"])
        if res.error is not None:
            errors[(size, seed)] = f"{type(res.error).__name__}: {res.error}"[:500]
        elif res.metrics and res.metrics.get("skipped"):
            skipped += 1
    return errors, skipped
