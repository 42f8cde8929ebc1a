"""LLM-as-judge machinery shared by stages: CRAFT's pairwise protocol (position swaps,
verdict parsing, win rates, ROUGE-L), the judge model's config, and running it on a
generation backend. The ``judge`` stage, evaluate's generative sets, the filter's judge and
rag_answer's evaluator all use it."""

from craft_ray.judging.backend import backend_generate, judge_rows
from craft_ray.judging.config import JudgeModelConfig
from craft_ray.judging.pairwise import JUDGE_TEMPLATE, judge_groups, judge_outputs, rouge_l

__all__ = ["JUDGE_TEMPLATE", "JudgeModelConfig", "backend_generate", "judge_groups",
           "judge_outputs", "judge_rows", "rouge_l"]
