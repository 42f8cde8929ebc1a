"""Ray actors of the generate stage: prompts built with the tokenizer loaded once per actor."""

from __future__ import annotations

from typing import Any

from craft_ray.models.tokenizers import load_chat_tokenizer
from craft_ray.stages.generate.prompts import (
    PromptSettings,
    ShotPool,
    build_prompt_rows,
    prompt_schema,
)
from craft_ray.tasks.registry import get_task


class PromptBuilder:
    """Ray Data actor: tokenizer loaded once, builds prompt rows per batch of documents."""

    def __init__(self, task_spec: Any, pool: ShotPool, settings: PromptSettings,
                 tokenizer: str | None) -> None:
        self.task = get_task(task_spec)
        self.pool = pool  # converted in the driver: workers need no access to the file
        self.settings = settings
        self.tokenizer = load_chat_tokenizer(tokenizer)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = build_prompt_rows(batch.to_pylist(), self.task, self.pool, self.settings,
                                 self.tokenizer)
        return pa.Table.from_pylist(rows, schema=prompt_schema())
