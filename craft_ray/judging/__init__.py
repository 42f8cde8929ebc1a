"""LLM-as-judge machinery shared by stages: CRAFT's pairwise protocol (position swaps,
verdict parsing, win rates, ROUGE-L), the judge model's config, and running it on a
generation backend. The ``judge`` stage, evaluate's generative sets, the filter's judge and
rag_answer's evaluator all use it."""

from craft_ray.judging.backend import backend_generate, judge_rows
from craft_ray.judging.config import JudgeModelConfig
from craft_ray.judging.pairwise import (
    JUDGE_TEMPLATE,
    JudgeReply,
    judge_groups,
    judge_outputs,
    reply_error,
    rouge_l,
    warn_judge_errors,
)

__all__ = ["JUDGE_TEMPLATE", "JudgeModelConfig", "JudgeReply", "backend_generate", "judge_groups",
           "judge_outputs", "judge_rows", "reply_error", "rouge_l", "warn_judge_errors"]
