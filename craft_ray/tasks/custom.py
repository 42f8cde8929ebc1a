"""Custom tasks declared in YAML: fields, prompt, answer format."""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from craft_ray.config import StrictModel
from craft_ray.tasks.base import (
    LETTERS,
    PromptVariant,
    Task,
    TaskError,
    TaskValidationError,
    schema_object,
    string_field,
    string_list_field,
)
from craft_ray.tasks.fewshots import FewShot

# ---------------------------------------------------------------------------------------------
# Custom tasks


class FieldSpec(StrictModel):
    """One field of a custom task's record."""

    name: str = Field(min_length=1, description="Field name (a JSON key of the answer).")
    type: Literal["string", "list"] = Field(
        default="string", description="'string' or 'list' (a list of strings)."
    )
    min_chars: int = Field(
        default=1, ge=0, description="Minimum length of a string field after stripping."
    )
    min_items: int = Field(default=1, ge=0, description="Minimum items of a list field.")
    max_items: int | None = Field(
        default=None, ge=1, description="Maximum items of a list field (none: no limit)."
    )
    enum: list[str] | None = Field(
        default=None, description="Allowed values of a string field (none: any)."
    )


class CustomTaskConfig(StrictModel):
    """A task defined in YAML: meta-instruction + (JSON schema or field list) + few-shot mapping.

    Example::

        task:
          name: faq
          meta_instruction: "Please read the text below. Then write one question ... as JSON: ..."
          fields: [{name: question, min_chars: 10}, {name: answer, min_chars: 20}]
          fewshot_fields: {question: "{Instruction}", answer: "{Output}"}
          training_prompt: "{question}"
          training_completion: "{answer}"
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Task name (letters, digits, '_', '-', '.').")
    meta_instruction: str = Field(
        min_length=1,
        description="Text asking the generator for one sample as JSON (shown before each text).",
    )
    fields: list[FieldSpec] | None = Field(
        default=None, description="The record's fields (give this or json_schema)."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON schema of the answer, an object with properties (give this or "
        "fields); validated with the jsonschema package.",
    )
    fewshot_fields: dict[str, str] | None = Field(
        default=None,
        description="How a few-shot becomes a record: field -> template over the few-shot's "
        "keys ('{Instruction}'); a list field splits its text on lines. None: the few-shot's "
        "output field must hold the record as a JSON object.",
    )
    training_prompt: str | None = Field(
        default=None,
        description="Template of the fine-tuning prompt over record fields (lists joined by "
        "newlines). Default: the first field.",
    )
    training_completion: str | None = Field(
        default=None,
        description="Template of the fine-tuning completion. Default: the other fields, "
        "'name: value' per line.",
    )
    options_field: str | None = Field(
        default=None,
        description="For a multiple-choice custom task: the list field holding the options "
        "(enables mc_letters).",
    )
    system_prompt: str = Field(default="", description="System prompt for train/evaluate.")
    max_new_tokens: int = Field(
        default=1024, ge=1, le=131072, description="Default generation budget for this task."
    )

    @model_validator(mode="after")
    def _one_schema(self) -> CustomTaskConfig:
        if (self.fields is None) == (self.json_schema is None):
            raise ValueError("give exactly one of 'fields' (a field list) or 'json_schema'")
        if self.json_schema is not None:
            props = self.json_schema.get("properties")
            if self.json_schema.get("type") != "object" or not isinstance(props, dict) or not props:
                raise ValueError("json_schema must be an object schema with 'properties'")
        return self


def _join(value: Any) -> str:
    return "\n".join(str(v) for v in value) if isinstance(value, list) else str(value)


class CustomTask(Task):
    """A task defined by :class:`CustomTaskConfig`."""

    def __init__(self, cfg: CustomTaskConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.system_prompt = cfg.system_prompt
        self.max_new_tokens = cfg.max_new_tokens
        if cfg.json_schema is not None:
            import jsonschema

            schema = cfg.json_schema
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise TaskError(
                    f"task {cfg.name!r}: json_schema is not valid: {exc.message}"
                ) from None
            self._validator = jsonschema.Draft202012Validator(schema)
            self.record_fields = list(schema["properties"])
            self._list_fields = {
                k for k, v in schema["properties"].items()
                if isinstance(v, dict) and v.get("type") == "array"
            }
        else:
            assert cfg.fields is not None
            names = [f.name for f in cfg.fields]
            if len(set(names)) != len(names):
                raise TaskError(f"task {cfg.name!r}: duplicate field names in {names}")
            self._validator = None
            self.record_fields = names
            self._list_fields = {f.name for f in cfg.fields if f.type == "list"}
            schema = schema_object({f.name: self._field_schema(f) for f in cfg.fields})
        if cfg.options_field is not None and cfg.options_field not in self._list_fields:
            raise TaskError(
                f"task {cfg.name!r}: options_field {cfg.options_field!r} is not a list field "
                f"(list fields: {sorted(self._list_fields)})"
            )
        self.is_multiple_choice = cfg.options_field is not None
        self.variants = [PromptVariant("default", cfg.meta_instruction, schema)]
        for tmpl_name in ("training_prompt", "training_completion"):
            tmpl = getattr(cfg, tmpl_name)
            if tmpl is not None:
                self._check_template(tmpl, tmpl_name)

    def _check_template(self, tmpl: str, what: str) -> None:
        names = {f for _, f, _, _ in string.Formatter().parse(tmpl) if f}
        unknown = names - set(self.record_fields)
        if unknown:
            raise TaskError(
                f"task {self.name!r}: {what} names unknown field(s) {sorted(unknown)} "
                f"(record fields: {self.record_fields})"
            )

    @staticmethod
    def _field_schema(f: FieldSpec) -> dict[str, Any]:
        if f.type == "list":
            s: dict[str, Any] = {"type": "array", "items": {"type": "string", "minLength": 1},
                                 "minItems": f.min_items}
            if f.max_items is not None:
                s["maxItems"] = f.max_items
            return s
        if f.enum is not None:
            return {"type": "string", "enum": f.enum}
        return {"type": "string", "minLength": f.min_chars}

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            raise TaskValidationError("Answer is not a JSON object.")
        if self._validator is not None:
            err = next(iter(sorted(self._validator.iter_errors(dict(obj)), key=str)), None)
            if err is not None:
                where = "/".join(str(p) for p in err.absolute_path) or "<root>"
                raise TaskValidationError(f"Schema violation at {where}: {err.message}")
            return {k: obj.get(k) for k in self.record_fields}
        assert self.cfg.fields is not None
        out: dict[str, Any] = {}
        for f in self.cfg.fields:
            if f.type == "list":
                items = string_list_field(obj, f.name, f"Field '{f.name}' not in list format.")
                if len(items) < f.min_items:
                    raise TaskValidationError(
                        f"Field '{f.name}' has fewer than {f.min_items} items."
                    )
                if f.max_items is not None and len(items) > f.max_items:
                    raise TaskValidationError(
                        f"Field '{f.name}' has more than {f.max_items} items."
                    )
                out[f.name] = items
            else:
                val = string_field(obj, f.name)
                if f.enum is not None and val not in f.enum:
                    raise TaskValidationError(f"Field '{f.name}' is not one of {f.enum}.")
                if len(val) < f.min_chars:
                    raise TaskValidationError(
                        f"Field '{f.name}' shorter than {f.min_chars} characters."
                    )
                out[f.name] = val
        return out

    def sample_text(self, record: Mapping[str, Any]) -> str:
        return "\n".join(f"{k}: {_join(record[k])}" for k in self.record_fields)

    def training_pair(self, record: Mapping[str, Any]) -> tuple[str, str]:
        vals = {k: _join(record[k]) for k in self.record_fields}
        first, rest = self.record_fields[0], self.record_fields[1:]
        prompt = (self.cfg.training_prompt.format(**vals) if self.cfg.training_prompt
                  else vals[first])
        completion = (self.cfg.training_completion.format(**vals) if self.cfg.training_completion
                      else "\n".join(f"{k}: {vals[k]}" for k in rest))
        return prompt, completion

    def mc_letters(self, record: Mapping[str, Any]) -> list[str]:
        if self.cfg.options_field is None:
            return super().mc_letters(record)
        return list(LETTERS[: len(record[self.cfg.options_field])])

    def convert_fewshot(self, shot: FewShot) -> tuple[dict[str, Any], list[str]]:
        notes: list[str] = []
        if self.cfg.fewshot_fields is None:
            try:
                raw = json.loads(shot.output)
            except json.JSONDecodeError:
                raw = None
            if not isinstance(raw, dict):
                raise TaskError(
                    f"few-shot {shot.id}: task {self.name!r} has no fewshot_fields, so the "
                    "few-shot's output must be the record as a JSON object; it is not. Set "
                    "fewshot_fields (e.g. {answer: '{Output}'}) in the task config."
                )
        else:
            raw = {}
            for key, tmpl in self.cfg.fewshot_fields.items():
                try:
                    text = tmpl.format(**shot.record)
                except KeyError as exc:
                    raise TaskError(
                        f"few-shot {shot.id}: fewshot_fields.{key} names {exc}, which the "
                        f"few-shot does not have (has {sorted(shot.record)})"
                    ) from None
                raw[key] = (
                    [ln.strip() for ln in text.split("\n") if ln.strip()]
                    if key in self._list_fields else text
                )
        return self._finish_fewshot(raw, notes)
