"""The train stage: prepare the datasets, build a Ray TorchTrainer, run it, keep the adapter."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from craft_ray.config import ConfigError
from craft_ray.models.tokenizers import load_train_tokenizer
from craft_ray.resources import actor_resources
from craft_ray.runtime import StageDir, StageStats, storage
from craft_ray.stages.train.config import TrainConfig, TrainStageConfig, check_resources, resume_key
from craft_ray.stages.train.data import resolve_train_template
from craft_ray.stages.train.datasets import prepare_datasets
from craft_ray.stages.train.loop import train_loop_per_worker

logger = logging.getLogger(__name__)


def make_plan(cfg: TrainConfig, train_rows: int) -> dict[str, int]:
    """Steps per epoch and in total; every worker does the same number of steps.

    Ray Train's split gives every worker ``floor(rows / workers)`` rows (equal split).
    """
    rows_per_worker = train_rows // cfg.num_workers
    if rows_per_worker < 1:
        raise ConfigError(f"train: {train_rows} training rows for {cfg.num_workers} workers; "
                          "need at least one row per worker")
    micro = math.ceil(rows_per_worker / cfg.per_device_batch_size)
    steps_per_epoch = math.ceil(micro / cfg.grad_accum)
    return {"rows_per_worker": rows_per_worker, "micro_batches_per_epoch": micro,
            "steps_per_epoch": steps_per_epoch, "total_steps": steps_per_epoch * cfg.epochs,
            "grad_accum": cfg.grad_accum}

# --- the stage -----------------------------------------------------------------------------


def build_trainer(stage_cfg: TrainStageConfig, datasets: dict[str, Any], plan: dict[str, int],
                  trial_dir: str, callbacks: list[Any] | None = None) -> Any:
    """The TorchTrainer of one fine-tune (gloo on CPU, NCCL on GPU)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = stage_cfg.train
    # the tokenising actor (data_num_cpus) runs beside the workers
    cpus, threads = actor_resources(cfg.cpus_per_worker, cfg.num_workers, float(cfg.use_gpu),
                                    cfg.torch_threads, key="train",
                                    task_cpus=cfg.data_num_cpus,
                                    names=("num_workers", "cpus_per_worker"))
    cfg = cfg.model_copy(update={"cpus_per_worker": cpus, "torch_threads": threads})  # workers too
    # Ray Train's runs and checkpoints: under the trial's folder by default, an object store
    # included (through the same pyarrow filesystem as every other output)
    fs, storage_path = storage.ray_storage(cfg.storage_path or storage.join(trial_dir, "ray"))
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json"), "plan": plan,
                           "trial_dir": trial_dir if storage.is_uri(trial_dir)
                           else str(Path(trial_dir).resolve()),
                           "has_eval": "eval" in datasets},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers,
                                               use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"{cfg.name()}-{resume_key(cfg)}", storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.num_checkpoints_to_keep),
            callbacks=callbacks or None),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )


def trial_dir_of(stage_cfg: TrainStageConfig) -> str:
    """The trial's folder: RUN_DIR/train/NAME (a local path or an object-store URI)."""
    return storage.join(stage_cfg.run_dir, "train", stage_cfg.train.name())


def _install_adapter(checkpoint: Any, adapter_dir: str) -> None:
    """Copy the checkpoint's ``adapter/`` folder to ``adapter_dir`` (replacing an older one)
    through a temporary folder and a rename (an upload on an object store)."""
    with checkpoint.as_directory() as ckpt, storage.write_once(adapter_dir) as tmp:
        shutil.copytree(Path(ckpt) / "adapter", tmp)
        storage.remove(adapter_dir)  # a rename does not replace a folder


def run_train(stage_cfg: TrainStageConfig, *, force: bool = False,
              callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Fine-tune one LoRA adapter (Ray must be initialised). Returns the trial's stats.

    A finished trial with the same config is not redone (unless ``force``); an unfinished one
    resumes from its last Ray Train checkpoint.
    """
    cfg = stage_cfg.train
    check_resources(cfg)
    trial_dir = trial_dir_of(stage_cfg)
    stage = StageDir(storage.parent(trial_dir), storage.name(trial_dir))
    if not force and stage.is_complete(cfg):
        logger.info("train: %s already complete (same config); skipping",
                    storage.redact(trial_dir))
        return {**stage.read_stats(), "skipped": True}
    if force:
        storage.remove(trial_dir)
    stage.begin(cfg)
    tokenizer = load_train_tokenizer(cfg.base_model)
    template = resolve_train_template(cfg, tokenizer)
    stats = StageStats("train")
    datasets, data_stats = prepare_datasets(stage_cfg, trial_dir, template)
    plan = make_plan(cfg, data_stats["train_rows"])
    logger.info("train %s: %d rows, %d workers x batch %d x accumulation %d = %d; "
                "%d steps/epoch, %d steps", cfg.name(), data_stats["train_rows"],
                cfg.num_workers, cfg.per_device_batch_size, cfg.grad_accum, cfg.batch_size,
                plan["steps_per_epoch"], plan["total_steps"])
    trainer = build_trainer(stage_cfg, datasets, plan, trial_dir, callbacks)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    final = dict(result.metrics or {})
    finished = final.get("step", 0) >= plan["total_steps"]
    adapter_dir = storage.join(trial_dir, "adapter" if finished else "adapter_partial")
    _install_adapter(result.checkpoint, adapter_dir)
    stats.rows_in = data_stats["rows_in"]
    stats.rows_out = data_stats["train_rows"]
    stats.rejects.update(data_stats["rejects"])
    stats.extra.update({
        "trial": cfg.name(), "seed": cfg.seed, "dataset_size": cfg.dataset_size,
        "adapter": adapter_dir if storage.is_uri(adapter_dir)
        else str(Path(adapter_dir).resolve()), "finished": finished,
        "steps": final.get("step"), "total_steps": plan["total_steps"],
        "train_loss": final.get("loss"), "eval_loss": final.get("eval_loss"),
        "tokens_per_s": final.get("tokens_per_s"), "max_length": data_stats["max_length"],
        "eval_rows": data_stats["eval_rows"], "checkpoint": result.checkpoint.path,
    })
    if finished:
        return stage.finish(cfg, stats)
    data = stats.finish()
    storage.write_json(storage.join(trial_dir, "stats.json"), data)
    logger.info("train %s: stopped after %s of %d steps; rerun to resume (partial adapter "
                "in %s)", cfg.name(), final.get("step"), plan["total_steps"], adapter_dir)
    return data
