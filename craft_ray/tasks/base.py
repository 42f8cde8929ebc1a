"""Task definitions: what a task sample looks like, how to ask for it, how to check it.

A :class:`Task` knows, for one task:

- its *meta-instruction(s)* (CRAFT's prompt text that asks the generator for one sample as JSON)
  and the JSON schema of that answer (used for guided decoding);
- how a human few-shot (``Text`` / ``Instruction`` / ``Output``) becomes a task record;
- how to parse and validate a generated answer into a record (:meth:`Task.parse`,
  :meth:`Task.validate`), with one exact message per failure (CRAFT's messages, e.g.
  ``"Number of answer options other than 4."``);
- the record's columns (``record_fields``, those of CRAFT's released datasets), its canonical
  one-string form (``sample_text``, used for dedup / leakage / decontamination) and its
  fine-tuning pair (``training_pair``).

Built-ins: ``bioqa`` and ``medqa`` (4-option multiple choice), ``csqa`` (yes/no, question or
statement variant), ``recipegen`` and ``summarization``. Custom tasks come from YAML
(:class:`CustomTaskConfig`): a meta-instruction plus a JSON schema or a field list.

Invariant: every record returned by ``validate`` / ``parse`` / ``fewshot_record`` has exactly the
keys ``record_fields``, in that order.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from craft_ray.tasks.fewshots import FewShot

logger = logging.getLogger(__name__)


BUILTIN_TASKS = ("bioqa", "medqa", "csqa", "recipegen", "summarization")

# CRAFT's meta-instructions (code/utils/ts_creation.py, MetaInstructions), verbatim.
QA_MC_INSTRUCTION = (
    "Please carefully read the text below. "
    "Then, generate exactly one question along with four answer choices designated as A, B, C, "
    "and D based on the provided text. "
    "Then, respond to the question with the correct answer using only the corresponding letter "
    "label. "
    "Return the output only as a JSON structure in this format: "
    '{"question": "<question here>", "options": ["A. <option A here>", "B. <option B here>", '
    '"C. <option C here>", "D. <option D here>"], "answer": "<letter label of correct answer '
    'here>"}'
)

QA_YN_INSTRUCTION_Q = (
    "Please carefully read the text below. "
    "Then, generate exactly one question that is answerable with yes or no based on the "
    "provided text. "
    "Then, respond to the question with the correct answer using only the corresponding letter "
    "label. "
    "Return the output only as a JSON structure in this format: "
    '{"question": "<question here>", "options": ["A. Yes", "B. No"], "answer": "<letter label '
    'of correct answer here>"}'
)

QA_YN_INSTRUCTION_S = (
    "Please carefully read the text below. "
    "Then, generate exactly one statement that is answerable with yes or no based on the "
    "provided text. "
    "Then, respond to the statement with the correct answer using only the corresponding letter "
    "label. "
    "Return the output only as a JSON structure in this format: "
    '{"statement": "<statement here>", "options": ["A. Yes", "B. No"], "answer": "<letter label '
    'of correct answer here>"}'
)

RECIPEGEN_INSTRUCTION = (
    "Please carefully read the text below. "
    "Then, generate exactly one short one-sentence instruction to prepare the dish named in the "
    "text. "
    "Then, generate a detailed recipe for the dish by listing the required ingredients and "
    "steps. "
    "Return the output only as a JSON structure in this format: "
    '{"instruction": "<short one-sentence cooking instruction here>", "ingredients": '
    '["<ingredient one here>", "<ingredient two here>", "< ... >", "<continue until end>"], '
    '"steps": ["<step one here>", "<step two here>", "< ... >", "<continue until end>"]}'
)

SUMMARIZATION_INSTRUCTION = (
    "Please carefully read the text below. "
    "Then, generate exactly one instruction for summarizing the text below. "
    "Then, generate the summary. "
    "Afterwards, extract a long but clean version of the initial text that encompasses the "
    "summary, but keeps almost all details from the initial text. "
    "Return the output only as a JSON structure in this format: "
    '{"instruction": "<summary instruction here>", "summary": "<summary here>", '
    '"long_but_clean_text": "<long but clean text that encompasses the summary but keeps almost '
    'all details from the initial text here>"} '
)

# CRAFT's system prompts for fine-tuning / evaluation (code/utils/common.py, SystemPrompts).
SYSTEM_PROMPTS = {
    "bioqa": "You are an expert biologist. Select the correct answer from the questions below. "
    "Answer only with the corresponding letter label.",
    "medqa": "You are a medical expert. Select the correct answer from the questions below. "
    "Answer only with the corresponding letter label.",
    "csqa": "You are an expert in common-sense reasoning. Select the correct answer from the "
    "questions below. Answer only with the corresponding letter label.",
    "recipegen": "You are an expert chef. Directly answer what is asked without additional "
    "opening and closing remarks.",
    "summarization": "You are an expert summarizer. Directly answer what is asked without "
    "additional opening and closing remarks.",
}

# CRAFT's generation budgets (run_configs/*/create_tasks: --max_new_tokens).
CRAFT_MAX_NEW_TOKENS = {
    "bioqa": 1536, "medqa": 256, "csqa": 256, "recipegen": 1280, "summarization": 1536,
}

LETTERS = string.ascii_uppercase

# Messages of the parser (not of a task's validation rules); fixed strings so that
# rejects can be counted by reason.
NO_JSON = "No JSON found."

MALFORMED_JSON = "Malformed or truncated JSON."

EMPTY_OUTPUT = "Empty generation."


class TaskError(ValueError):
    """A task name or task definition is wrong (raised before any work starts)."""


class TaskValidationError(ValueError):
    """A candidate record breaks the task's rules; ``str(exc)`` is the exact, fixed message."""


@dataclass(frozen=True)
class PromptVariant:
    """One way of asking for a sample: meta-instruction, answer schema, the answer's key names.

    ``renames`` maps record field -> key used in this variant's JSON (csqa's statement variant
    asks for ``statement`` where the record has ``question``).
    """

    name: str
    meta_instruction: str
    schema: dict[str, Any]
    renames: tuple[tuple[str, str], ...] = ()

    def to_answer_json(self, record: Mapping[str, Any]) -> str:
        """The record as this variant's JSON answer (how a few-shot answer is shown)."""
        ren = dict(self.renames)
        return json.dumps({ren.get(k, k): v for k, v in record.items()}, ensure_ascii=False)

# ---------------------------------------------------------------------------------------------
# JSON extraction


def iter_json_objects(text: str) -> list[dict[str, Any]]:
    """Every top-level JSON object in ``text``, in order (prose and code fences are skipped).

    Scans for ``{`` and decodes greedily from there; an object nested in an earlier one is not
    reported separately. Raw control characters inside strings (a literal newline or tab, as
    models write them) are accepted.
    """
    dec = json.JSONDecoder(strict=False)
    out: list[dict[str, Any]] = []
    pos = text.find("{")
    while pos != -1:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict):
            out.append(obj)
        pos = text.find("{", end)
    return out

# ---------------------------------------------------------------------------------------------
# Tasks


class Task:
    """Base of all tasks; subclasses define the conversion and validation rules.

    Public interface (used by generate, filter, train and evaluate): ``name``,
    ``record_fields``, ``variants``, ``system_prompt``, ``max_new_tokens``,
    ``is_multiple_choice``, :meth:`validate`, :meth:`parse`, :meth:`sample_text`,
    :meth:`training_pair`, :meth:`fewshot_record`, :meth:`convert_fewshot`,
    :meth:`mc_letters`, :meth:`output_schema`.
    """

    name: str = ""
    record_fields: list[str] = []
    variants: list[PromptVariant] = []
    system_prompt: str = ""
    max_new_tokens: int = 1024
    is_multiple_choice: bool = False

    # --- validation -------------------------------------------------------------------------
    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Check a candidate (a parsed JSON object) and return the normalised record.

        Raises :class:`TaskValidationError` with an exact message when a rule is broken.
        """
        raise NotImplementedError

    def check_source(self, record: Mapping[str, Any], source: str) -> None:
        """Rules that need the source document (e.g. no verbatim copy); none by default.

        Raises :class:`TaskValidationError` with a fixed message.
        """

    def parse(self, text: str, source: str = "") -> dict[str, Any]:
        """The first JSON object in ``text`` that passes :meth:`validate` (and, given the
        source document, :meth:`check_source`), as a record.

        Raises :class:`TaskValidationError`: ``"Empty generation."``, ``"No JSON found."``,
        ``"Malformed or truncated JSON."``, or the validation message of the first object found
        (the one the model most likely meant as its answer).
        """
        if not text or not text.strip():
            raise TaskValidationError(EMPTY_OUTPUT)
        objs = iter_json_objects(text)
        if not objs:
            raise TaskValidationError(MALFORMED_JSON if "{" in text else NO_JSON)
        first_error: TaskValidationError | None = None
        for obj in objs:
            try:
                record = self.validate(obj)
                self.check_source(record, source)
                return record
            except TaskValidationError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    def output_schema(self, variant: str | None = None) -> dict[str, Any]:
        """JSON schema of the generator's answer for a variant (default: the first)."""
        return self.variant(variant).schema

    def variant(self, name: str | None = None) -> PromptVariant:
        """A prompt variant by name (``None``: the first)."""
        if name is None:
            return self.variants[0]
        for v in self.variants:
            if v.name == name:
                return v
        raise TaskError(
            f"task {self.name!r} has no prompt variant {name!r} "
            f"(has {[v.name for v in self.variants]})"
        )

    # --- record forms -----------------------------------------------------------------------
    def sample_text(self, record: Mapping[str, Any]) -> str:
        """Canonical one-string form of a record (dedup, leakage and decontamination)."""
        raise NotImplementedError

    def training_pair(self, record: Mapping[str, Any]) -> tuple[str, str]:
        """(prompt, completion) as plain text; the caller applies the chat template."""
        raise NotImplementedError

    def mc_letters(self, record: Mapping[str, Any]) -> list[str]:
        """Answer letters of a multiple-choice record (``["A".."D"]``; ``["A", "B"]`` for csqa)."""
        raise TaskError(f"task {self.name!r} is not a multiple-choice task")

    # --- few-shots --------------------------------------------------------------------------
    def convert_fewshot(self, shot: FewShot) -> tuple[dict[str, Any], list[str]]:
        """A few-shot as a task record plus notes on every quirk met (empty list: none).

        Human few-shots are kept even when they break a generation rule (e.g. a summary under
        100 characters): the rule is noted, the record is returned as written.
        """
        raise NotImplementedError

    def fewshot_record(self, shot: FewShot) -> dict[str, Any]:
        """A few-shot converted to a task record (quirks repaired; see :meth:`convert_fewshot`)."""
        record, notes = self.convert_fewshot(shot)
        for note in notes:
            logger.warning("few-shot %s (%s): %s", shot.id, self.name, note)
        return record

    def _finish_fewshot(
        self, raw: dict[str, Any], notes: list[str]
    ) -> tuple[dict[str, Any], list[str]]:
        try:
            return self.validate(raw), notes
        except TaskValidationError as exc:
            notes.append(f"breaks a generation rule (kept as written): {exc}")
            return {k: raw.get(k) for k in self.record_fields}, notes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

# --- field helpers ---------------------------------------------------------------------------


def require_field(obj: Mapping[str, Any], key: str) -> Any:
    if key not in obj or obj[key] is None:
        raise TaskValidationError(f"Missing field '{key}'.")
    return obj[key]


def string_field(obj: Mapping[str, Any], key: str) -> str:
    val = require_field(obj, key)
    if not isinstance(val, str):
        raise TaskValidationError(f"Field '{key}' is not a string.")
    return val.strip()


def string_list_field(obj: Mapping[str, Any], key: str, not_list_msg: str) -> list[str]:
    val = require_field(obj, key)
    if not isinstance(val, list):
        raise TaskValidationError(not_list_msg)
    if not all(isinstance(v, str) for v in val):
        raise TaskValidationError(f"Field '{key}' holds a non-string item.")
    return [v.strip() for v in val if v.strip()]


def schema_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
