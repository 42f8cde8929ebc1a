"""Tasks (the record formats the pipeline generates and trains on) and few-shot files."""

from craft_ray.tasks.base import (
    BUILTIN_TASKS,
    CRAFT_MAX_NEW_TOKENS,
    EMPTY_OUTPUT,
    LETTERS,
    MALFORMED_JSON,
    NO_JSON,
    QA_MC_INSTRUCTION,
    QA_YN_INSTRUCTION_Q,
    QA_YN_INSTRUCTION_S,
    RECIPEGEN_INSTRUCTION,
    SUMMARIZATION_INSTRUCTION,
    SYSTEM_PROMPTS,
    PromptVariant,
    Task,
    TaskError,
    TaskValidationError,
    iter_json_objects,
)
from craft_ray.tasks.registry import (
    get_task,
)

__all__ = [
    "BUILTIN_TASKS",
    "CRAFT_MAX_NEW_TOKENS",
    "EMPTY_OUTPUT",
    "LETTERS",
    "MALFORMED_JSON",
    "NO_JSON",
    "PromptVariant",
    "QA_MC_INSTRUCTION",
    "QA_YN_INSTRUCTION_Q",
    "QA_YN_INSTRUCTION_S",
    "RECIPEGEN_INSTRUCTION",
    "SUMMARIZATION_INSTRUCTION",
    "SYSTEM_PROMPTS",
    "Task",
    "TaskError",
    "TaskValidationError",
    "get_task",
    "iter_json_objects",
]
