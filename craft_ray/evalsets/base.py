"""Eval-set items, configs and errors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from craft_ray.config import StrictModel
from craft_ray.evalsets.custom import CustomEvalFields

LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")

EvalSetName = Literal["commonsenseqa", "medqa", "scienceqa_bio", "medmcqa", "csqa2",
                      "cnn_dailymail", "recipenlg", "custom"]

# Generative sets and the CRAFT task whose records they hold.
GENERATIVE_SETS = {"cnn_dailymail": "summarization", "recipenlg": "recipegen"}

# CRAFT's evaluation instruction for CNN/DailyMail (FormatExtractor.summarization, official).
CNN_INSTRUCTION = "Please summarize the text below:"

RECIPE_INSTRUCTION = "How can I cook {title}? List the ingredients and the steps."

# CRAFT's summarization subset: sklearn train_test_split(test_size=1000, random_state=1234).
CRAFT_SUBSET = {"cnn_dailymail": (1000, 1234)}


class EvalSetError(ValueError):
    """An evaluation set cannot be loaded at all (missing file, no hub access, wrong split)."""


class RowError(ValueError):
    """One source row is unusable; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EvalItem:
    """One multiple-choice question, independent of its source schema.

    Invariant: ``letters == LETTERS[:len(choices)]`` and ``gold in letters``.
    """

    id: str
    question: str
    choices: list[str]
    letters: list[str]
    gold: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def options(self) -> list[str]:
        """Choices in CRAFT's task-record form: ``["A. text", "B. text", ...]``."""
        return [f"{ltr}. {txt}" for ltr, txt in zip(self.letters, self.choices)]

    def as_row(self) -> dict[str, Any]:
        """A flat dict for Ray Data / Parquet (meta as a JSON string)."""
        row = asdict(self)
        row["meta"] = json.dumps(self.meta, sort_keys=True, default=str)
        return row


@dataclass(frozen=True)
class GenItem:
    """One generative item: a record of ``task`` (the CRAFT task's ``record_fields``).

    ``Task.training_pair(record)`` gives (prompt text, reference output), so an item is
    prompted exactly as that task's training data was.
    """

    id: str
    task: str
    record: dict[str, Any]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalReject:
    """A source row that could not be turned into an :class:`EvalItem`."""

    source: str
    row: int
    reason: str
    detail: str
    raw: str


class EvalSetConfig(StrictModel):
    """One evaluation set: which loader, where its data is, how much of it."""

    name: EvalSetName = Field(description="Which set (decides the loader and its schema).")
    path: str | None = Field(
        default=None,
        description="Local file in the set's original schema (.jsonl/.json/.parquet). Required "
        "for commonsenseqa and medqa; for the hub sets it replaces the hub download.",
    )
    hub_id: str | None = Field(
        default=None,
        description="Hub dataset id for the hub sets (default: the one CRAFT used).",
    )
    split: str | None = Field(
        default=None, description="Hub split (default: the one CRAFT evaluated on)."
    )
    label: str | None = Field(
        default=None, description="Name in outputs (default: the set's name).", min_length=1
    )
    limit: int | None = Field(
        default=None, ge=1, description="Evaluate at most this many items (after shuffling)."
    )
    shuffle_seed: int | None = Field(
        default=None,
        description="Shuffle items with this seed before `limit` (default: keep file order).",
    )
    hub_config: str | None = Field(
        default=None, description="Hub dataset config (cnn_dailymail: default '3.0.0')."
    )
    craft_subset: bool = Field(
        default=False,
        description="cnn_dailymail: evaluate CRAFT's 1000 test articles (the test part of "
        "sklearn train_test_split(range(n), test_size=1000, random_state=1234), in its order).",
    )
    instruction: str | None = Field(
        default=None, min_length=1,
        description="Generative sets: the instruction of each item (cnn_dailymail: CRAFT's "
        "'Please summarize the text below:'; recipenlg: a template with {title}, default "
        "'How can I cook {title}? List the ingredients and the steps.').",
    )

    fields: CustomEvalFields | None = Field(
        default=None,
        description="name=custom only: how the columns of your file (path: .jsonl, .json, "
        ".parquet or .csv) map onto a multiple-choice or generative item.",
    )

    @model_validator(mode="after")
    def _needs_path(self) -> EvalSetConfig:
        if (self.name == "custom") != (self.fields is not None):
            raise ValueError("a custom eval set needs `fields` (the column mapping), and only "
                             "a custom set takes it")
        if self.name in LOCAL_ONLY and not self.path:
            raise ValueError(
                f"eval set {self.name!r} is read from a local file: set path "
                f"(e.g. {LOCAL_ONLY[self.name]})"
            )
        if self.craft_subset and self.name not in CRAFT_SUBSET:
            raise ValueError(f"craft_subset exists for {sorted(CRAFT_SUBSET)} only, not "
                             f"{self.name!r}; use limit + shuffle_seed")
        if self.instruction and self.name not in GENERATIVE_SETS:
            raise ValueError(f"instruction applies to generative sets {sorted(GENERATIVE_SETS)}")
        if self.name == "recipenlg" and self.instruction and "{title}" not in self.instruction:
            raise ValueError("recipenlg instruction must contain '{title}'")
        return self

    @property
    def display_name(self) -> str:
        return self.label or self.name

    @property
    def kind(self) -> Literal["multiple_choice", "generative"]:
        """multiple_choice (accuracy) or generative (ROUGE-L, judge win rate)."""
        if self.fields is not None:
            return self.fields.kind
        return "generative" if self.name in GENERATIVE_SETS else "multiple_choice"

    @property
    def task(self) -> str | None:
        """The CRAFT task whose records a generative set holds (None for MC sets); a custom
        set's task may be a custom-task mapping."""
        if self.fields is not None:
            return self.fields.task  # type: ignore[return-value]
        return GENERATIVE_SETS.get(self.name)


LOCAL_ONLY = {
    "commonsenseqa": "../shared/data/eval/commonsenseqa/dev_rand_split.jsonl",
    "medqa": "../shared/data/eval/medqa/US/4_options/phrases_no_exclude_test.jsonl",
    # the hub's recipe_nlg needs a manual download, so the release file is read directly
    "recipenlg": "/data/recipenlg/RecipeNLG_dataset.csv",
    "custom": "my_eval.jsonl",
}

# (hub id, split) CRAFT's run_eval.py used for each hub set.
HUB_DEFAULTS = {
    "scienceqa_bio": ("derek-thomas/ScienceQA", "test"),
    "medmcqa": ("openlifescienceai/medmcqa", "validation"),
    "csqa2": ("tasksource/commonsense_qa_2.0", "validation"),
    "cnn_dailymail": ("abisee/cnn_dailymail", "test"),
}

HUB_CONFIGS = {"cnn_dailymail": "3.0.0"}
