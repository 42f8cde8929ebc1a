"""Evaluation sets: loading, parsing and validating benchmark items."""

from craft_ray.evalsets.base import (
    CNN_INSTRUCTION,
    CRAFT_SUBSET,
    GENERATIVE_SETS,
    HUB_CONFIGS,
    HUB_DEFAULTS,
    LETTERS,
    LOCAL_ONLY,
    RECIPE_INSTRUCTION,
    EvalItem,
    EvalReject,
    EvalSetConfig,
    EvalSetError,
    EvalSetName,
    GenItem,
    RowError,
)
from craft_ray.evalsets.loading import (
    craft_subset_rows,
    gold_distribution,
    load_eval_set,
    parse_rows,
)

__all__ = [
    "CNN_INSTRUCTION",
    "CRAFT_SUBSET",
    "EvalItem",
    "EvalReject",
    "EvalSetConfig",
    "EvalSetError",
    "EvalSetName",
    "GENERATIVE_SETS",
    "GenItem",
    "HUB_CONFIGS",
    "HUB_DEFAULTS",
    "LETTERS",
    "LOCAL_ONLY",
    "RECIPE_INSTRUCTION",
    "RowError",
    "craft_subset_rows",
    "gold_distribution",
    "load_eval_set",
    "parse_rows",
]
