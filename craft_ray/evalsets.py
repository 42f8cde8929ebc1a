"""Loaders for the evaluation sets, each read in its original schema.

Every loader turns one source row into an item or an :class:`EvalReject` with a reason, so one
bad row is reported and skipped instead of stopping an evaluation. Multiple-choice sets give an
:class:`EvalItem` (question, choice texts, the letters A, B, ... in order, the gold letter);
generative sets give a :class:`GenItem` (a record of the CRAFT task the set evaluates, whose
``Task.training_pair`` is the prompt and the reference output).

Sets and where they come from:

=================  =====================================  ==========================  =====
name               source                                  schema                      opts
=================  =====================================  ==========================  =====
``commonsenseqa``  local ``*_rand_split.jsonl``            answerKey, question.stem,   5
                                                           question.choices[label,text]
``medqa``          local ``US/4_options/*.jsonl``          question, options{A..D},    4
                                                           answer_idx
``scienceqa_bio``  hub ``derek-thomas/ScienceQA`` test,    question, choices[],        2-5
                   ``topic == "biology"`` (CRAFT bioqa)    answer (index), topic
``medmcqa``        hub ``openlifescienceai/medmcqa``       question, opa..opd, cop     4
                   validation (CRAFT medqa)
``csqa2``          hub ``tasksource/commonsense_qa_2.0``   question, answer yes/no     2
                   validation (CRAFT csqa)
=================  =====================================  ==========================  =====

Generative sets (the reference is the task's completion text):

==================  ====================================  ===========================  =========
name                source                                schema                       task
==================  ====================================  ===========================  =========
``cnn_dailymail``   hub ``abisee/cnn_dailymail`` 3.0.0    article, highlights, id      summari-
                    test (CRAFT: 1000 items, see                                       zation
                    ``craft_subset``)
``recipenlg``       local RecipeNLG release               title, ingredients,          recipegen
                    (``RecipeNLG_dataset.csv`` or a       directions (lists, or JSON
                    .jsonl/.parquet of the hub's          list strings in the CSV),
                    ``recipe_nlg`` columns)               link, source, NER
==================  ====================================  ===========================  =========

CRAFT evaluated summarization on 1000 CNN/DailyMail test articles (``run_eval.py``: sklearn
``train_test_split(range(n), test_size=1000, random_state=1234)``, prompt
``"Please summarize the text below:\n{article}"``, reference ``highlights``) and recipe
generation on 1000 held-out RecipeNLG recipes (its ``datasets/recipenlg/test.jsonl`` with
``instruction``/``ingredients``/``steps``; that file is not published, so rows in that form
are read as they are and RecipeNLG rows get an instruction from ``instruction_template``).

A hub set can also be read from a local copy (``path``: a .jsonl, .json or .parquet file with
the hub's columns), which is what the tests and air-gapped clusters use.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from craft_ray.config import StrictModel

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D", "E", "F", "G", "H")

EvalSetName = Literal["commonsenseqa", "medqa", "scienceqa_bio", "medmcqa", "csqa2",
                      "cnn_dailymail", "recipenlg", "cst", "multihop", "rag_answer"]

# Generative sets and the CRAFT task whose records they hold.
GENERATIVE_SETS = {"cnn_dailymail": "summarization", "recipenlg": "recipegen",
                   # issue 17: records of a generation strategy (jsonl/parquet in its layout);
                   # rag_answer items are prompted with their noisy chunks, as in training
                   "cst": "cst", "multihop": "multihop", "rag_answer": "rag_answer"}

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

    @model_validator(mode="after")
    def _needs_path(self) -> EvalSetConfig:
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
        return "generative" if self.name in GENERATIVE_SETS else "multiple_choice"

    @property
    def task(self) -> str | None:
        """The CRAFT task whose records a generative set holds (None for MC sets)."""
        return GENERATIVE_SETS.get(self.name)


LOCAL_ONLY = {
    "commonsenseqa": "../shared/data/eval/commonsenseqa/dev_rand_split.jsonl",
    "medqa": "../shared/data/eval/medqa/US/4_options/phrases_no_exclude_test.jsonl",
    # the hub's recipe_nlg needs a manual download, so the release file is read directly
    "recipenlg": "/data/recipenlg/RecipeNLG_dataset.csv",
    "cst": "RUN_DIR/generate/clean.jsonl (held-out cst records)",
    "multihop": "RUN_DIR/generate/clean.jsonl (held-out multihop records)",
    "rag_answer": "RUN_DIR/generate/clean.jsonl (held-out rag_answer records)",
}

# (hub id, split) CRAFT's run_eval.py used for each hub set.
HUB_DEFAULTS = {
    "scienceqa_bio": ("derek-thomas/ScienceQA", "test"),
    "medmcqa": ("openlifescienceai/medmcqa", "validation"),
    "csqa2": ("tasksource/commonsense_qa_2.0", "validation"),
    "cnn_dailymail": ("abisee/cnn_dailymail", "test"),
}
HUB_CONFIGS = {"cnn_dailymail": "3.0.0"}


# --- per-row parsers (pure functions; each raises RowError on a bad row) --------------------


def _text(obj: dict[str, Any], key: str, where: str = "") -> str:
    val = obj.get(key)
    if not isinstance(val, str) or not val.strip():
        raise RowError(f"missing_{key}", f"field {where}{key!r} is missing or empty")
    return val.strip()


def _check_choices(choices: list[Any], n_min: int = 2) -> list[str]:
    if len(choices) < n_min:
        raise RowError("too_few_choices", f"{len(choices)} choices, need at least {n_min}")
    if len(choices) > len(LETTERS):
        raise RowError("too_many_choices", f"{len(choices)} choices, at most {len(LETTERS)}")
    out = []
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise RowError("empty_choice", f"choice {i} is empty or not a string")
        out.append(c.strip())
    return out


def parse_commonsenseqa(obj: dict[str, Any], idx: int) -> EvalItem:
    """CommonsenseQA 1.0 (``{"answerKey", "id", "question": {"stem", "choices": [...]}}``)."""
    q = obj.get("question")
    if not isinstance(q, dict):
        raise RowError("missing_question", "field 'question' is not an object")
    stem = _text(q, "stem", "question.")
    raw_choices = q.get("choices")
    if not isinstance(raw_choices, list) or not all(isinstance(c, dict) for c in raw_choices):
        raise RowError("bad_choices", "question.choices is not a list of {label, text}")
    labels = [c.get("label") for c in raw_choices]
    choices = _check_choices([c.get("text") for c in raw_choices])
    letters = list(LETTERS[: len(choices)])
    if labels != letters:
        raise RowError("bad_labels", f"choice labels {labels} are not {letters}")
    gold = obj.get("answerKey")
    if gold is None or gold == "":
        raise RowError("missing_answer", "no answerKey (the official test split has none)")
    if gold not in letters:
        raise RowError("bad_answer", f"answerKey {gold!r} not in {letters}")
    return EvalItem(id=str(obj.get("id") or idx), question=stem, choices=choices,
                    letters=letters, gold=gold, source="commonsenseqa",
                    meta={"question_concept": q.get("question_concept")})


def parse_medqa(obj: dict[str, Any], idx: int) -> EvalItem:
    """MedQA USMLE (``{"question", "answer", "options": {"A": ...}, "answer_idx", ...}``)."""
    question = _text(obj, "question")
    options = obj.get("options")
    if not isinstance(options, dict) or not options:
        raise RowError("bad_choices", "field 'options' is not a non-empty {letter: text} map")
    keys = sorted(options)
    letters = list(LETTERS[: len(keys)])
    if keys != letters:
        raise RowError("bad_labels", f"option keys {keys} are not {letters}")
    choices = _check_choices([options[k] for k in letters])
    gold = obj.get("answer_idx")
    if gold is None or gold == "":
        raise RowError("missing_answer", "no answer_idx")
    if gold not in letters:
        raise RowError("bad_answer", f"answer_idx {gold!r} not in {letters}")
    answer = obj.get("answer")
    gold_text = choices[letters.index(gold)]
    if isinstance(answer, str) and answer.strip() and answer.strip() != gold_text:
        raise RowError("answer_mismatch",
                       f"answer text {answer!r} is not option {gold} ({gold_text!r})")
    return EvalItem(id=str(obj.get("id") or idx), question=question, choices=choices,
                    letters=letters, gold=gold, source="medqa",
                    meta={"meta_info": obj.get("meta_info")})


def parse_scienceqa(obj: dict[str, Any], idx: int) -> EvalItem:
    """ScienceQA (``question``, ``choices`` list, ``answer`` index, ``topic``...)."""
    question = _text(obj, "question")
    raw = obj.get("choices")
    if not isinstance(raw, list):
        raise RowError("bad_choices", "field 'choices' is not a list")
    choices = _check_choices(raw)
    letters = list(LETTERS[: len(choices)])
    ans = obj.get("answer")
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(choices):
        raise RowError("bad_answer", f"answer {ans!r} is not an index into {len(choices)} choices")
    return EvalItem(id=str(obj.get("id") or idx), question=question, choices=choices,
                    letters=letters, gold=letters[ans], source="scienceqa_bio",
                    meta={k: obj.get(k) for k in ("topic", "subject", "grade", "category")})


def parse_medmcqa(obj: dict[str, Any], idx: int) -> EvalItem:
    """MedMCQA (``question``, ``opa``..``opd``, ``cop`` index 0-3; test split has no cop)."""
    question = _text(obj, "question")
    choices = []
    for key in ("opa", "opb", "opc", "opd"):
        if key not in obj:
            raise RowError("bad_choices", f"field {key!r} is missing")
        choices.append(obj[key])
    choices = _check_choices(choices, n_min=4)
    letters = list(LETTERS[:4])
    cop = obj.get("cop")
    if cop is None or cop == -1:
        raise RowError("missing_answer", "no cop (the official test split has none)")
    if isinstance(cop, bool) or not isinstance(cop, int) or not 0 <= cop < 4:
        raise RowError("bad_answer", f"cop {cop!r} is not 0-3")
    return EvalItem(id=str(obj.get("id") or idx), question=question, choices=choices,
                    letters=letters, gold=letters[cop], source="medmcqa",
                    meta={k: obj.get(k) for k in ("subject_name", "topic_name", "choice_type")})


def parse_csqa2(obj: dict[str, Any], idx: int) -> EvalItem:
    """CommonsenseQA 2.0 (``question``, ``answer`` "yes"/"no"): A. yes / B. no as in CRAFT."""
    question = _text(obj, "question")
    ans = obj.get("answer")
    if ans is None or ans == "":
        raise RowError("missing_answer", "no answer (the official test split has none)")
    if not isinstance(ans, str) or ans.strip().lower() not in ("yes", "no"):
        raise RowError("bad_answer", f"answer {ans!r} is not yes/no")
    gold = "A" if ans.strip().lower() == "yes" else "B"
    return EvalItem(id=str(obj.get("id") or idx), question=question, choices=["yes", "no"],
                    letters=["A", "B"], gold=gold, source="csqa2",
                    meta={"confidence": obj.get("confidence")})


def parse_cnn_dailymail(obj: dict[str, Any], idx: int, instruction: str | None = None
                        ) -> GenItem:
    """CNN/DailyMail 3.0.0 (``article``, ``highlights``, ``id``) as a summarization record."""
    article = _text(obj, "article")
    highlights = _text(obj, "highlights")
    return GenItem(id=str(obj.get("id") or idx), task="summarization", record={
        "instruction": instruction or CNN_INSTRUCTION, "summary": highlights,
        "long_but_clean_text": article}, source="cnn_dailymail")


def _str_list(obj: dict[str, Any], key: str) -> list[str]:
    """A list of strings: a list, or (RecipeNLG's CSV) a JSON list written as a string."""
    val = obj.get(key)
    if isinstance(val, str):
        try:
            val = json.loads(val)
        except json.JSONDecodeError:
            raise RowError(f"bad_{key}", f"field {key!r} is a string but not a JSON list") \
                from None
    if not isinstance(val, list):
        raise RowError(f"bad_{key}", f"field {key!r} is missing or not a list")
    items = [v.strip() for v in val if isinstance(v, str) and v.strip()]
    if len(items) != len(val):
        raise RowError(f"bad_{key}", f"field {key!r} has empty or non-string entries")
    if not items:
        raise RowError(f"empty_{key}", f"field {key!r} is empty")
    return items


def parse_recipenlg(obj: dict[str, Any], idx: int, instruction: str | None = None
                    ) -> GenItem:
    """RecipeNLG (``title``, ``ingredients``, ``directions``, ``link``, ``source``, ``NER``)
    as a recipegen record; a row already in CRAFT's form (``instruction``, ``ingredients``,
    ``steps``) is taken as it is."""
    if "steps" in obj and "instruction" in obj:
        ins = _text(obj, "instruction")
        ingredients, steps = _str_list(obj, "ingredients"), _str_list(obj, "steps")
        title = None
    else:
        title = _text(obj, "title")
        ingredients, steps = _str_list(obj, "ingredients"), _str_list(obj, "directions")
        ins = (instruction or RECIPE_INSTRUCTION).format(title=title)
    rid = obj.get("id", obj.get("", obj.get("Unnamed: 0")))
    return GenItem(id=str(rid if rid not in (None, "") else idx), task="recipegen",
                   record={"instruction": ins, "ingredients": ingredients, "steps": steps},
                   source="recipenlg",
                   meta={"title": title, "link": obj.get("link"), "origin": obj.get("source")})


def _strategy_parser(name: str) -> Callable[..., GenItem]:
    """A parser of records in a generation strategy's layout (issue 17)."""

    def parse(obj: dict[str, Any], idx: int, instruction: str | None = None) -> GenItem:
        from craft_ray.tasks import TaskValidationError, get_task

        try:
            record = get_task(name).validate(obj)
        except TaskValidationError as exc:
            raise RowError("bad_record", str(exc)) from None
        return GenItem(id=str(obj.get("sample_id") or idx), task=name, record=record,
                       source=name, meta={"doc_id": obj.get("doc_id")})

    return parse


PARSERS: dict[str, Callable[..., EvalItem | GenItem]] = {
    "cst": _strategy_parser("cst"),
    "multihop": _strategy_parser("multihop"),
    "rag_answer": _strategy_parser("rag_answer"),
    "commonsenseqa": parse_commonsenseqa,
    "medqa": parse_medqa,
    "scienceqa_bio": parse_scienceqa,
    "medmcqa": parse_medmcqa,
    "csqa2": parse_csqa2,
    "cnn_dailymail": parse_cnn_dailymail,
    "recipenlg": parse_recipenlg,
}


def _row_filter(name: str) -> Callable[[dict[str, Any]], bool] | None:
    if name == "scienceqa_bio":  # CRAFT's bioqa: ScienceQA test, biology only
        return lambda obj: obj.get("topic") == "biology"
    return None


# --- reading ---------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(row number, object or None when the line is not a JSON object, raw line)."""
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield i, None, line
                continue
            yield i, obj if isinstance(obj, dict) else None, line


def _iter_local(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} or {id: row}
            data = data.get("data", list(data.values()))
        for i, obj in enumerate(data):
            yield i, obj if isinstance(obj, dict) else None, json.dumps(obj)[:2000]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, obj in enumerate(pq.read_table(path).to_pylist()):
            yield i, obj, ""
    elif suffix == ".csv":  # RecipeNLG's release: an unnamed index column, lists as JSON
        import csv

        with path.open("r", encoding="utf-8", errors="replace", newline="") as fh:
            for i, rec in enumerate(csv.DictReader(fh)):
                yield i, dict(rec), ""
    else:
        raise EvalSetError(f"eval file {path}: unknown format {suffix!r} (use .jsonl, .json, "
                           ".parquet or .csv in the set's original schema)")


def _iter_hub(hub_id: str, split: str, config: str | None = None
              ) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a hard dependency
        raise EvalSetError("loading a hub set needs `pip install datasets`") from exc
    try:
        kwargs = {"name": config} if config else {}
        ds = datasets.load_dataset(hub_id, split=split, **kwargs)
    except Exception as exc:  # network, auth, unknown split: all stop before work starts
        raise EvalSetError(
            f"cannot load hub dataset {hub_id!r} split {split!r}: {exc}. Without hub access, "
            "download it elsewhere and set the eval set's `path` to a local .jsonl/.parquet "
            "copy with the same columns."
        ) from exc
    if "image" in ds.column_names:  # never decode images: only the text is evaluated
        ds = ds.remove_columns(["image"])
    for i, obj in enumerate(ds):
        yield i, dict(obj), ""


def _raw(obj: dict[str, Any] | None, line: str) -> str:
    if line:
        return line.rstrip("\n")[:2000]
    return json.dumps(obj, default=str)[:2000]


def parse_rows(name: str, rows: Iterable[tuple[int, dict[str, Any] | None, str]],
               source: str, instruction: str | None = None
               ) -> tuple[list[Any], list[EvalReject]]:
    """Parse ``(row, obj, raw)`` triples with the set's parser; bad rows become rejects.

    Items are :class:`EvalItem` for multiple-choice sets, :class:`GenItem` for generative ones
    (``instruction`` is their instruction / template).
    """
    parser: Callable[..., Any] = PARSERS[name]
    if name in GENERATIVE_SETS:
        parser = functools.partial(parser, instruction=instruction)
    keep = _row_filter(name)
    items: list[Any] = []
    rejects: list[EvalReject] = []
    seen: set[str] = set()
    for i, obj, line in rows:
        if obj is None:
            rejects.append(EvalReject(source, i, "malformed_json", "not a JSON object",
                                      line[:2000]))
            continue
        if keep is not None and not keep(obj):
            continue
        try:
            item = parser(obj, i)
        except RowError as err:
            rejects.append(EvalReject(source, i, err.reason, err.detail, _raw(obj, line)))
            continue
        if item.id in seen:
            rejects.append(EvalReject(source, i, "duplicate_id", f"id {item.id!r} seen before",
                                      _raw(obj, line)))
            continue
        seen.add(item.id)
        items.append(item)
    return items, rejects


def craft_subset_rows(n_rows: int, size: int, seed: int) -> list[int]:
    """Row indices of CRAFT's evaluation subset, in CRAFT's order.

    CRAFT took ``train_test_split(range(n), test_size=size, random_state=seed)[1]``; sklearn's
    ShuffleSplit draws ``RandomState(seed).permutation(n)`` and the test part is its first
    ``size`` entries (all rows when there are fewer).
    """
    import numpy as np

    return [int(i) for i in np.random.RandomState(seed).permutation(n_rows)[:size]]


def load_eval_set(cfg: EvalSetConfig, base_dir: str | Path | None = None
                  ) -> tuple[list[Any], list[EvalReject]]:
    """Load one evaluation set: its items (shuffled/limited as configured) and its rejects.

    Raises :class:`EvalSetError` when the set cannot be read at all (missing file, hub
    unreachable); a bad row is a reject, never an error.
    """
    if cfg.path:
        path = Path(cfg.path)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise EvalSetError(f"eval set {cfg.display_name!r}: file {path} does not exist "
                               "(fix `path`, or drop it to load a hub set from the hub)")
        rows = _iter_local(path)
        source = str(path)
    else:
        hub_id, split = HUB_DEFAULTS[cfg.name]
        hub_id = cfg.hub_id or hub_id
        split = cfg.split or split
        config = cfg.hub_config or HUB_CONFIGS.get(cfg.name)
        rows = _iter_hub(hub_id, split, config)
        source = f"{hub_id}{'/' + config if config else ''}:{split}"
    if cfg.craft_subset:
        # the subset indexes the source rows (before parsing), as CRAFT's select() did
        all_rows = list(rows)
        size, seed = CRAFT_SUBSET[cfg.name]
        rows = iter([all_rows[i] for i in craft_subset_rows(len(all_rows), size, seed)])
    items, rejects = parse_rows(cfg.name, rows, source, cfg.instruction)
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(items)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    if rejects:
        logger.warning("eval set %s: %d rows rejected (%s)", cfg.display_name, len(rejects),
                       dict(Counter(r.reason for r in rejects)))
    if not items:
        raise EvalSetError(f"eval set {cfg.display_name!r} ({source}) has no usable items; "
                           f"rejects by reason: {dict(Counter(r.reason for r in rejects))}")
    logger.info("eval set %s: %d items from %s", cfg.display_name, len(items), source)
    return items, rejects


def gold_distribution(items: Iterable[EvalItem]) -> dict[str, int]:
    """How many items have each gold letter (the accuracy of always answering that letter)."""
    return dict(sorted(Counter(it.gold for it in items).items()))
