"""Config of the sweep stage."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from craft_ray.config import RayConfig, StrictModel
from craft_ray.stages.train import TrainConfig


class SweepConfig(StrictModel):
    """Config of ``craft-ray sweep`` (the grid; each trial uses the ``train`` section)."""

    seeds: list[int] = Field(default_factory=lambda: [1234, 2024, 9999], min_length=1,
                             description="Training seeds (CRAFT: 1234, 2024, 9999).")
    sizes: list[str] = Field(default_factory=lambda: ["S", "M", "L", "XL"], min_length=1,
                             description="Dataset sizes (folders under "
                             "RUN_DIR/filter/datasets).")
    metric: str = Field(default="eval_loss", min_length=1,
                        description="Metric Tune records as the objective (mode min).")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, le=100_000,
        description="Trials at once (default: as many as the cluster's GPUs, or CPUs on a "
        "CPU cluster, fit at train.num_workers workers each).")
    max_failures: int = Field(default=1, ge=0, le=100,
                              description="Times Tune retries a failed trial.")
    trial_cpus: float = Field(default=0.01, gt=0, le=64,
                              description="CPUs reserved for a trial's driver function (the "
                              "Train workers reserve their own; Tune needs a non-zero "
                              "request).")
    name: str = Field(default="sweep", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Experiment name (Tune folder RUN_DIR/sweep/tune/NAME-TIME).")
    verbose: int = Field(default=1, ge=0, le=3, description="Tune console verbosity.")

    @field_validator("seeds", "sizes")
    @classmethod
    def _unique(cls, v: list[Any]) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError(f"values must be unique, got {v}")
        return v


class SweepStageConfig(StrictModel):
    """A YAML file for ``craft-ray sweep``: common keys plus ``train`` and ``sweep``."""

    run_dir: str = Field(default="runs/default", description="Run directory.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    train: TrainConfig
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="The grid.")
