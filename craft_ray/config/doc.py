"""``craft-ray config show`` / ``validate``: configs that explain themselves.

Every key of every stage, with its type, default and description, is read from the pydantic
models themselves (the same ones that validate a YAML), so the listing cannot drift from the
code.
"""

from __future__ import annotations

import json
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from craft_ray.config.base import ConfigError
from craft_ray.config.loading import load_config

DEFAULT_WIDTH = 60  # characters of a default shown before it is cut


@dataclass(frozen=True)
class KeyDoc:
    """One documented key: dotted path (``[]`` marks list items), type, default, meaning."""

    key: str
    type: str
    default: str
    description: str


def sections() -> dict[str, tuple[type[BaseModel], str]]:
    """Name -> (config model, what it configures), in pipeline order.

    ``common`` are the keys every YAML shares (``run_dir``, ``ray``); the stage names are the
    YAML sections; ``eval-retrieval`` and ``mine-negatives`` take ``--set`` keys only.
    """
    from craft_ray.pipeline import PipelineConfig
    from craft_ray.retrieval.evaluation import RetrievalEvalConfig
    from craft_ray.retrieval.negatives import MineNegativesConfig
    from craft_ray.stages.judge import JudgeStageConfig

    out: dict[str, tuple[type[BaseModel], str]] = {}
    fields = PipelineConfig.model_fields
    out["common"] = (_Common, "keys at the top of every YAML")
    for name in ("embed", "retrieve", "generate", "filter", "train", "sweep", "evaluate"):
        (model,) = [m for m in _models_in(fields[name].annotation)]
        out[name] = (model, fields[name].description or name)
    out["judge"] = (_model_of(JudgeStageConfig, "judge"), "LLM-judge stage (craft-ray judge)")
    out["eval-retrieval"] = (RetrievalEvalConfig, "craft-ray eval-retrieval (--set keys)")
    out["mine-negatives"] = (MineNegativesConfig, "craft-ray mine-negatives (--set keys)")
    return out


class _Common(BaseModel):
    """The common keys of a pipeline YAML (a view of PipelineConfig without the sections)."""


def _common_fields() -> dict[str, Any]:
    from craft_ray.pipeline import PipelineConfig

    return {k: PipelineConfig.model_fields[k] for k in ("run_dir", "ray")}


def _model_of(stage_model: type[BaseModel], section: str) -> type[BaseModel]:
    (model,) = _models_in(stage_model.model_fields[section].annotation)
    return model


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation names (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        for m in _models_in(arg):
            if m not in found:
                found.append(m)
    return found


def _container(annotation: Any) -> str:
    """``'[]'`` when the models sit in list items, ``'.NAME'`` in dict values, else ``''``."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return "[]"
    if origin is dict:
        return ".<name>"
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if _models_in(arg):
                return _container(arg)
    return ""


def type_name(annotation: Any) -> str:
    """A short readable type: ``int | None``, ``list[str]``, ``Literal['hf', 'vllm']``."""
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]"
    return str(annotation).replace("typing.", "")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(its keys follow)"
    text = json.dumps(value, default=str)
    return text if len(text) <= DEFAULT_WIDTH else text[: DEFAULT_WIDTH - 3] + "..."


def describe(model: type[BaseModel], prefix: str = "") -> list[KeyDoc]:
    """Every key of ``model`` and of the models nested in it, depth first."""
    fields = _common_fields() if model is _Common else model.model_fields
    docs: list[KeyDoc] = []
    for name, field in fields.items():
        key = f"{prefix}{name}"
        docs.append(KeyDoc(key, type_name(field.annotation), _default(field),
                           " ".join((field.description or "").split())))
        nested = [m for m in _models_in(field.annotation) if m is not model]
        for sub in nested:
            docs.extend(describe(sub, f"{key}{_container(field.annotation)}."))
    return docs


def render(docs: list[KeyDoc], width: int = 100) -> str:
    """Two lines or more per key: ``key: type = default`` then the wrapped description."""
    lines = []
    for d in docs:
        lines.append(f"{d.key}: {d.type} = {d.default}")
        lines.extend(textwrap.wrap(d.description or "(no description)", width,
                                   initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)


def show(stage: str | None = None) -> str:
    """The text of ``craft-ray config show [STAGE]``."""
    secs = sections()
    if stage is not None and stage not in secs:
        raise ConfigError(f"no config section {stage!r}; choose one of {list(secs)}")
    parts = []
    for name, (model, what) in secs.items():
        if stage is not None and name != stage:
            continue
        prefix = "" if name in ("common", "eval-retrieval", "mine-negatives") else f"{name}."
        parts.append(f"# {name}: {what}\n{render(describe(model, prefix))}")
    return "\n\n".join(parts)


def validate_file(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Validate a whole-pipeline YAML without running anything; returns the stages it runs.

    Raises :class:`ConfigError` with every failing key.
    """
    from craft_ray.pipeline import PipelineConfig, plan

    cfg = load_config(PipelineConfig, path, overrides)
    return [st.name for st, _, _ in plan(cfg)]
