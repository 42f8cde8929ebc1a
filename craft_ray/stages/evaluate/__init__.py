"""The evaluate stage: base and fine-tuned models on eval sets, with intervals."""

from craft_ray.stages.evaluate.config import EvaluateConfig, EvaluateStageConfig
from craft_ray.stages.evaluate.stage import run_evaluate, stage_root

__all__ = ["EvaluateConfig", "EvaluateStageConfig", "run_evaluate", "stage_root"]
