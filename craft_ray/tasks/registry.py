"""Looking a task up by name: a built-in, or a custom task file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from craft_ray.tasks.base import Task, TaskError
from craft_ray.tasks.builtin import builtin_task
from craft_ray.tasks.custom import CustomTask, CustomTaskConfig


def get_task(spec: str | Mapping[str, Any] | CustomTaskConfig | Task) -> Task:
    """A task from a built-in name, a custom task config (model or mapping), or a Task."""
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, str):
        return builtin_task(spec)
    if isinstance(spec, CustomTaskConfig):
        return CustomTask(spec)
    if isinstance(spec, Mapping):
        from craft_ray.config import ConfigError, validate

        try:
            return CustomTask(validate(CustomTaskConfig, dict(spec), "task"))
        except ConfigError as exc:
            raise TaskError(str(exc)) from None
    raise TaskError(f"cannot make a task from {type(spec).__name__}: give a name or a mapping")
