"""The whole pipeline from one YAML: embed -> retrieve -> generate -> filter -> train/sweep
-> evaluate, in one run directory, with per-stage resume.

Resume rules (each stage writes ``_SUCCESS`` with the hash of its resolved config last):

- a stage whose marker exists with the same config hash is skipped;
- a stage whose config changed is rerun, and so is every stage after it (its inputs changed);
- ``from_stage`` reruns that stage and every later one.

Sections left out of the YAML are stages not run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, model_validator

from craft_ray.config import ConfigError, RayConfig, StrictModel
from craft_ray.runtime import StageDir, storage
from craft_ray.stages.embed import EmbedConfig, EmbedStageConfig, run_embed
from craft_ray.stages.evaluate import EvaluateConfig, EvaluateStageConfig, run_evaluate
from craft_ray.stages.evaluate import stage_root as evaluate_root
from craft_ray.stages.filter import FilterConfig, FilterStageConfig, run_filter
from craft_ray.stages.generate import GenerateConfig, GenerateStageConfig, run_generate
from craft_ray.stages.retrieve import RetrieveConfig, RetrieveStageConfig, run_retrieve
from craft_ray.stages.sweep import SweepConfig, SweepStageConfig, run_sweep
from craft_ray.stages.train import TrainConfig, TrainStageConfig, run_train, trial_dir_of

logger = logging.getLogger(__name__)


class PipelineConfig(StrictModel):
    """A whole-pipeline YAML: common keys plus one section per stage to run.

    ``train`` alone trains one adapter; ``train`` + ``sweep`` runs the seed x size grid with
    ``train`` as the template of every trial.
    """

    run_dir: str = Field(default="runs/default", description="Run directory of every stage.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    embed: EmbedConfig | None = Field(default=None, description="Embedding stage.")
    retrieve: RetrieveConfig | None = Field(default=None, description="Retrieval stage.")
    generate: GenerateConfig | None = Field(default=None, description="Generation stage.")
    filter: FilterConfig | None = Field(default=None, description="Filter/export stage.")
    train: TrainConfig | None = Field(default=None, description="LoRA fine-tuning.")
    sweep: SweepConfig | None = Field(default=None, description="Seeds x sizes on Ray Tune.")
    evaluate: EvaluateConfig | None = Field(default=None, description="Evaluation stage.")

    @model_validator(mode="after")
    def _sweep_needs_train(self) -> PipelineConfig:
        if self.sweep is not None and self.train is None:
            raise ValueError("a sweep section needs a train section (the template of each trial)")
        return self


@dataclass(frozen=True)
class Stage:
    """One pipeline step.

    ``sections``: the YAML sections its config takes; ``runner(stage_cfg, force)`` runs it;
    ``marker(stage_cfg)`` gives the folder holding its ``_SUCCESS`` and the config object
    hashed into it (the same object the stage itself checks).
    """

    name: str
    sections: tuple[str, ...]
    config_model: type[BaseModel]
    runner: Callable[[Any, bool], dict[str, Any]]
    marker: Callable[[Any], tuple[StageDir, BaseModel]]


def _section_marker(name: str) -> Callable[[Any], tuple[StageDir, BaseModel]]:
    def marker(scfg: Any) -> tuple[StageDir, BaseModel]:
        return StageDir(scfg.run_dir, name), getattr(scfg, name)
    return marker


def _train_marker(scfg: TrainStageConfig) -> tuple[StageDir, BaseModel]:
    d = trial_dir_of(scfg)
    return StageDir(storage.parent(d), storage.name(d)), scfg.train


def _evaluate_marker(scfg: EvaluateStageConfig) -> tuple[StageDir, BaseModel]:
    d = evaluate_root(scfg)
    return StageDir(storage.parent(d), storage.name(d)), scfg.evaluate


def _embed(c: EmbedStageConfig, force: bool) -> dict[str, Any]:
    return run_embed(c, force=force)


def _retrieve(c: RetrieveStageConfig, force: bool) -> dict[str, Any]:
    return run_retrieve(c, force=force)


def _generate(c: GenerateStageConfig, force: bool) -> dict[str, Any]:
    return run_generate(c, force=force)


def _filter(c: FilterStageConfig, force: bool) -> dict[str, Any]:
    return run_filter(c, force=force)


def _train(c: TrainStageConfig, force: bool) -> dict[str, Any]:
    return run_train(c, force=force)


def _sweep(c: SweepStageConfig, force: bool) -> dict[str, Any]:
    # The sweep resumes its finished trials itself (Ray Tune), so `force` is not needed.
    return run_sweep(c)


def _evaluate(c: EvaluateStageConfig, force: bool) -> dict[str, Any]:
    return run_evaluate(c, force=force)


def _sweep_marker(c: SweepStageConfig) -> tuple[StageDir, BaseModel]:
    return StageDir(c.run_dir, "sweep"), c


def stages() -> list[Stage]:
    """The stages in pipeline order."""
    return [
        Stage("embed", ("embed",), EmbedStageConfig, _embed, _section_marker("embed")),
        Stage("retrieve", ("retrieve",), RetrieveStageConfig, _retrieve,
              _section_marker("retrieve")),
        Stage("generate", ("generate",), GenerateStageConfig, _generate,
              _section_marker("generate")),
        Stage("filter", ("filter",), FilterStageConfig, _filter, _section_marker("filter")),
        Stage("train", ("train",), TrainStageConfig, _train, _train_marker),
        Stage("sweep", ("train", "sweep"), SweepStageConfig, _sweep, _sweep_marker),
        Stage("evaluate", ("evaluate",), EvaluateStageConfig, _evaluate, _evaluate_marker),
    ]


def stage_config(cfg: PipelineConfig, stage: Stage) -> BaseModel | None:
    """The stage's own config (common keys + its sections), or None if it does not run."""
    if any(getattr(cfg, sec) is None for sec in stage.sections):
        return None
    if stage.name == "train" and cfg.sweep is not None:
        return None  # the sweep trains every trial
    data = {"run_dir": cfg.run_dir, "ray": cfg.ray.model_dump()}
    data.update({sec: getattr(cfg, sec).model_dump() for sec in stage.sections})
    return stage.config_model.model_validate(data)


def plan(cfg: PipelineConfig, from_stage: str | None = None) -> list[tuple[Stage, BaseModel, str]]:
    """Which stages run and why: ``(stage, its config, 'skip' | 'run' | 'rerun: reason')``."""
    names = [s.name for s in stages()]
    if from_stage is not None and from_stage not in names:
        raise ConfigError(f"--from {from_stage!r} is not a stage; choose one of {names}")
    out: list[tuple[Stage, BaseModel, str]] = []
    invalid: str | None = None
    for st in stages():
        scfg = stage_config(cfg, st)
        if scfg is None:
            continue
        sdir, section = st.marker(scfg)
        if from_stage is not None and (from_stage == st.name or invalid):
            invalid = invalid or f"--from {from_stage}"
            out.append((st, scfg, f"rerun: {invalid}"))
        elif invalid:
            out.append((st, scfg, f"rerun: {invalid}" if sdir.exists() else "run"))
        elif sdir.is_complete(section):
            out.append((st, scfg, "skip"))
        elif sdir.has_marker():
            invalid = f"config of {st.name} changed"
            out.append((st, scfg, f"rerun: {invalid}"))
        else:
            out.append((st, scfg, "run"))
            invalid = f"{st.name} ran again, so its outputs may have changed"
    return out


def run_pipeline(cfg: PipelineConfig, from_stage: str | None = None,
                 on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every configured stage in order (Ray must be initialised). Returns stats per stage.

    ``on_stage(name)`` is called as each stage starts (the console names its progress).
    """
    results: dict[str, Any] = {}
    for st, scfg, decision in plan(cfg, from_stage):
        if decision == "skip":
            logger.info("%s: complete with the same config; skipped", st.name)
            results[st.name] = {"skipped": True}
            continue
        logger.info("%s: %s", st.name, decision)
        if on_stage is not None:
            on_stage(st.name)
        results[st.name] = st.runner(scfg, decision.startswith("rerun"))
    return results
