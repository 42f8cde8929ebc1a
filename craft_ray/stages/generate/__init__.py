"""The generate stage: retrieved documents + few-shots -> task records from an LLM."""

from craft_ray.stages.generate.config import GenerateConfig, GenerateStageConfig
from craft_ray.stages.generate.stage import run_generate

__all__ = ["GenerateConfig", "GenerateStageConfig", "run_generate"]
