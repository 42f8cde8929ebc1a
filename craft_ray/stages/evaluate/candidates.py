"""Which models to evaluate: the configured list, or the adapters of a sweep."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from craft_ray.runtime import storage
from craft_ray.stages.evaluate.config import EvaluateConfig, ModelSpec, SweepModelsConfig

logger = logging.getLogger(__name__)


# --- sweep discovery ---------------------------------------------------------------------------


def discover_sweep_models(sweep: SweepModelsConfig, run_dir: str | Path) -> list[ModelSpec]:
    """One model per finished sweep trial: base model + the trial's adapter, with its size,
    seed and series (``sweep.group``). Read from the sweep's ``results.jsonl``.

    An adapter folder recorded at sweep time that has moved is looked up again at
    ``{sweep folder}/../train/{trial}/adapter``; a trial without an adapter is skipped with a
    warning.
    """
    from craft_ray.config import ConfigError

    sdir = sweep.path or storage.join(run_dir, "sweep")
    table = storage.join(sdir, "results.jsonl")
    if not storage.is_file(table):
        raise ConfigError(f"evaluate.sweep: no sweep results at {table}; run `craft-ray "
                          "sweep` first or point evaluate.sweep.path at the sweep folder")
    base = sweep.base_model
    if base is None:
        import yaml

        conf = storage.join(sdir, "config.yaml")
        data = yaml.safe_load(storage.read_text(conf)) if storage.is_file(conf) else None
        base = ((data or {}).get("train") or {}).get("base_model")
        if not base:
            raise ConfigError(f"evaluate.sweep: cannot read train.base_model from {conf}; "
                              "set evaluate.sweep.base_model")
    models = []
    for line in storage.read_text(table).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        size = str(row["size"])
        if sweep.sizes is not None and size not in sweep.sizes:
            continue
        if row.get("status") != "finished":
            logger.warning("evaluate.sweep: trial %s did not finish (%s); not evaluated",
                           row.get("trial"), row.get("error") or row.get("status"))
            continue
        trial = str(row["trial"])
        candidates = [str(row["adapter"])] if row.get("adapter") else []
        candidates.append(storage.join(storage.parent(sdir), "train", trial, "adapter"))
        adapter = next((c for c in candidates
                        if storage.is_file(storage.join(c, "adapter_config.json"))), None)
        if adapter is None:
            logger.warning("evaluate.sweep: trial %s has no adapter at %s; not evaluated",
                           trial, " or ".join(map(str, candidates)))
            continue
        local = not storage.is_uri(adapter)
        models.append(ModelSpec(name=trial, model=base,
                                adapter=str(Path(adapter).resolve()) if local else adapter,
                                group=sweep.group, size=size, seed=row.get("seed"),
                                merge_adapter=sweep.merge_adapter))
    if not models:
        raise ConfigError(f"evaluate.sweep: no finished trial with an adapter in {table}")
    logger.info("evaluate.sweep: %d trials from %s", len(models), table)
    return models


def resolve_models(cfg: EvaluateConfig, run_dir: str | Path) -> list[ModelSpec]:
    """The listed models followed by the sweep's trials; names must stay unique."""
    from craft_ray.config import ConfigError

    models = list(cfg.models)
    if cfg.sweep is not None:
        models += discover_sweep_models(cfg.sweep, run_dir)
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"evaluate: model names {dup} are listed and also sweep trials; "
                          "rename the listed ones")
    return models


def check_models(cfg: EvaluateConfig, models: Sequence[ModelSpec] | None = None) -> None:
    from craft_ray.config import ConfigError

    for m in (cfg.models if models is None else models):
        if m.adapter and not storage.is_file(storage.join(m.adapter, "adapter_config.json")):
            raise ConfigError(f"model {m.name!r}: adapter {m.adapter} has no adapter_config.json "
                              "(point adapter at a PEFT folder, e.g. RUN_DIR/train/TRIAL/adapter)")
        if m.model.startswith((".", "/")) and not Path(m.model).exists():
            raise ConfigError(f"model {m.name!r}: {m.model} does not exist")
