"""The judge stage: pairwise LLM-as-judge of two models' generations; also used by evaluate."""

from craft_ray.stages.judge.config import JudgeModelConfig, JudgeStageConfig
from craft_ray.stages.judge.pairwise import JUDGE_TEMPLATE, judge_groups, rouge_l
from craft_ray.stages.judge.stage import backend_generate, run_judge

__all__ = [
    "JUDGE_TEMPLATE",
    "JudgeModelConfig",
    "JudgeStageConfig",
    "backend_generate",
    "judge_groups",
    "rouge_l",
    "run_judge",
]
