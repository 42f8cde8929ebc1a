"""The judge stage: pairwise LLM-as-judge of a model's generations against references (the
shared machinery is :mod:`craft_ray.judging`)."""

from craft_ray.stages.judge.config import JudgeConfig, JudgeStageConfig
from craft_ray.stages.judge.stage import run_judge

__all__ = ["JudgeConfig", "JudgeStageConfig", "run_judge"]
