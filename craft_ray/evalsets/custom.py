"""``custom`` eval sets: your own jsonl / Parquet / CSV file plus a field mapping.

Multiple choice (accuracy)::

    sets:
      - name: custom
        label: my_quiz
        path: data/my_quiz.jsonl
        fields:
          kind: multiple_choice
          question: question
          options: choices            # a column holding a list (or {"A": ..., "B": ...})
          # options: [opa, opb, opc]  # ... or one column per option
          answer: answer              # a letter, a 0-based index or the option's text
          answer_format: auto         # auto | letter | index | text

Generative (ROUGE-L, judge win rate): the record of a CRAFT task, whose training prompt is
the model's input and whose completion is the reference::

        fields:
          kind: generative
          task: summarization         # or recipegen, or a custom task mapping (generate.task)
          record: {long_but_clean_text: article, summary: highlights}
          values: {instruction: "Please summarize the text below:"}

The mapping is checked when the config loads (every field of the task covered, no unknown
ones); each row is checked as it is read (``custom_rows``), and a bad row becomes a reject
with its reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from craft_ray.config import StrictModel

MAX_OPTIONS = 8  # == len(evalsets.base.LETTERS) (base imports this module, so not from there)


class CustomEvalFields(StrictModel):
    """How the columns of your own eval file map onto an evaluation item."""

    kind: Literal["multiple_choice", "generative"] = Field(
        description="multiple_choice (scored by accuracy) or generative (the model writes an "
        "answer, scored by ROUGE-L and the judge).")
    id: str | None = Field(default=None, min_length=1,
                           description="Column with the item id (default: the row number).")
    question: str | None = Field(default=None, min_length=1,
                                 description="multiple_choice: column with the question.")
    options: str | list[str] | None = Field(
        default=None,
        description="multiple_choice: one column holding the options (a list, or a mapping "
        "letter -> text), or a list of columns, one per option (2 to 8).")
    answer: str | None = Field(
        default=None, min_length=1,
        description="multiple_choice: column with the right answer (see answer_format).")
    answer_format: Literal["auto", "letter", "index", "text"] = Field(
        default="auto",
        description="How the answer is written: letter ('B'), index (0-based: 1 = the second "
        "option), text (the option's text); auto tries letter, then index, then text.")
    task: str | dict[str, Any] | None = Field(
        default=None,
        description="generative: the CRAFT task whose prompt formats each item (a built-in "
        "name such as summarization or recipegen, or a custom task mapping as in "
        "generate.task).")
    record: dict[str, str] | None = Field(
        default=None,
        description="generative: task record field -> column of your file.")
    values: dict[str, Any] = Field(
        default_factory=dict,
        description="generative: task record field -> a fixed value for every item (e.g. "
        "the instruction).")

    @model_validator(mode="after")
    def _complete(self) -> CustomEvalFields:
        if self.kind == "multiple_choice":
            missing = [k for k in ("question", "options", "answer") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a multiple_choice custom set needs {missing} (column names)")
            if isinstance(self.options, list) and not 2 <= len(self.options) <= MAX_OPTIONS:
                raise ValueError(f"options: give 2 to {MAX_OPTIONS} columns")
            if self.task is not None or self.record is not None or self.values:
                raise ValueError("task/record/values belong to generative custom sets")
            return self
        if self.task is None or self.record is None:
            raise ValueError("a generative custom set needs task (the CRAFT task whose prompt "
                             "to use) and record (task field -> column)")
        if self.question or self.options or self.answer:
            raise ValueError("question/options/answer belong to multiple_choice custom sets")
        fields = task_fields(self.task)
        given = set(self.record) | set(self.values)
        unknown = sorted(given - set(fields))
        missing = [f for f in fields if f not in given]
        if unknown or missing:
            raise ValueError(f"task {self.task_name!r} has record fields {fields}: "
                             + (f"unknown {unknown}" if unknown else "")
                             + ("; " if unknown and missing else "")
                             + (f"not mapped {missing} (map them in record or values)"
                                if missing else ""))
        return self

    @property
    def task_name(self) -> str | None:
        if isinstance(self.task, dict):
            return str(self.task.get("name"))
        return self.task


def task_fields(task: str | dict[str, Any]) -> list[str]:
    """The record fields of a task (a :class:`ValueError` names a task that does not exist)."""
    from craft_ray.tasks import TaskError
    from craft_ray.tasks.registry import get_task

    try:
        return list(get_task(task).record_fields)
    except TaskError as exc:
        raise ValueError(str(exc)) from None
