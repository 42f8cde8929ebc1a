"""The sweep stage: a grid of train trials (e.g. data sizes x seeds) and their table."""

from craft_ray.stages.sweep.config import SweepConfig, SweepStageConfig
from craft_ray.stages.sweep.stage import run_sweep

__all__ = ["SweepConfig", "SweepStageConfig", "run_sweep"]
