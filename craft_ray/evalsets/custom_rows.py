"""Rows of a ``custom`` eval set (see :mod:`craft_ray.evalsets.custom`) to items."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from craft_ray.evalsets.base import LETTERS, EvalItem, GenItem, RowError
from craft_ray.evalsets.custom import CustomEvalFields


def _cell(obj: dict[str, Any], column: str, reason: str) -> Any:
    if column not in obj:
        raise RowError(reason, f"column {column!r} is missing (the row has {sorted(obj)[:12]})")
    val = obj[column]
    if val is None or (isinstance(val, str) and not val.strip()):
        raise RowError(reason, f"column {column!r} is empty")
    return val


def _options(obj: dict[str, Any], spec: str | list[str]) -> list[str]:
    if isinstance(spec, list):
        raw: Any = [_cell(obj, c, "missing_option") for c in spec]
    else:
        raw = _cell(obj, spec, "missing_options")
        if isinstance(raw, str):  # a JSON list (CSV) or one option per line
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raw = [line for line in raw.splitlines() if line.strip()]
        if isinstance(raw, dict):  # {"A": text, "B": text}
            keys = sorted(raw)
            if keys != list(LETTERS[: len(keys)]):
                raise RowError("bad_options", f"option keys {keys} are not A, B, ...")
            raw = [raw[k] for k in keys]
    if not isinstance(raw, list | tuple):
        raise RowError("bad_options", f"options are a {type(raw).__name__}, not a list")
    if not 2 <= len(raw) <= len(LETTERS):
        raise RowError("bad_options", f"{len(raw)} options; need 2 to {len(LETTERS)}")
    out = []
    for i, o in enumerate(raw):
        if not isinstance(o, str | int | float) or not str(o).strip():
            raise RowError("bad_options", f"option {i} is empty or not text")
        out.append(str(o).strip())
    return out


def _gold(answer: Any, options: list[str], fmt: str) -> str:
    letters = list(LETTERS[: len(options)])
    text = str(answer).strip()
    if fmt in ("auto", "letter"):
        cand = text.rstrip(".):").upper()
        if cand in letters:
            return cand
        if fmt == "letter":
            raise RowError("bad_answer", f"answer {text!r} is not one of the letters {letters}")
    if fmt in ("auto", "index"):
        if isinstance(answer, int) or text.lstrip("-").isdigit():
            idx = int(text)
            if 0 <= idx < len(options):
                return letters[idx]
            if fmt == "index":
                raise RowError("bad_answer", f"answer index {idx} is outside 0..{len(options) - 1}")
        elif fmt == "index":
            raise RowError("bad_answer", f"answer {text!r} is not an index")
    matches = [i for i, o in enumerate(options) if o.casefold() == text.casefold()]
    if len(matches) == 1:
        return letters[matches[0]]
    if len(matches) > 1:
        raise RowError("ambiguous_answer", f"answer {text!r} matches several options")
    raise RowError("bad_answer", f"answer {text!r} is no letter, index or option text of "
                   f"{len(options)} options")


def _list_value(val: Any) -> list[str]:
    if isinstance(val, str):
        try:
            parsed = json.loads(val)
        except json.JSONDecodeError:
            parsed = [line.strip() for line in val.splitlines() if line.strip()]
        val = parsed
    if not isinstance(val, list) or not val:
        raise RowError("bad_record", "a list field is empty or not a list")
    return [str(v) for v in val]


def custom_parser(fields: CustomEvalFields) -> Callable[[dict[str, Any], int], Any]:
    """A row parser (``obj, row -> EvalItem | GenItem``, :class:`RowError` on a bad row)."""
    if fields.kind == "multiple_choice":
        def parse_mc(obj: dict[str, Any], idx: int) -> EvalItem:
            question = str(_cell(obj, fields.question or "", "missing_question")).strip()
            options = _options(obj, fields.options or [])
            gold = _gold(_cell(obj, fields.answer or "", "missing_answer"), options,
                         fields.answer_format)
            item_id = str(obj.get(fields.id) if fields.id and obj.get(fields.id) is not None
                          else idx)
            return EvalItem(id=item_id, question=question, choices=options,
                            letters=list(LETTERS[: len(options)]), gold=gold, source="custom")
        return parse_mc

    from craft_ray.tasks.registry import get_task

    task = get_task(fields.task)  # type: ignore[arg-type]  # checked by the config
    list_fields = {k for k, v in task.output_schema().get("properties", {}).items()
                   if isinstance(v, dict) and v.get("type") == "array"}

    def parse_gen(obj: dict[str, Any], idx: int) -> GenItem:
        record = dict(fields.values)
        for field, column in (fields.record or {}).items():
            record[field] = _cell(obj, column, f"missing_{field}")
        for field in list_fields & set(record):
            record[field] = _list_value(record[field])
        record = {f: record[f] for f in task.record_fields}
        try:
            task.training_pair(record)
        except Exception as exc:  # noqa: BLE001 - any failure of the task on this row
            raise RowError("bad_record", f"the task cannot format this row: {exc}") from None
        item_id = str(obj.get(fields.id) if fields.id and obj.get(fields.id) is not None
                      else idx)
        return GenItem(id=item_id, task=fields.task_name or "", record=record, source="custom")
    return parse_gen
