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
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from craft_ray.config import StrictModel
from craft_ray.fewshots import FewShot

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


def _require(obj: Mapping[str, Any], key: str) -> Any:
    if key not in obj or obj[key] is None:
        raise TaskValidationError(f"Missing field '{key}'.")
    return obj[key]


def _string(obj: Mapping[str, Any], key: str) -> str:
    val = _require(obj, key)
    if not isinstance(val, str):
        raise TaskValidationError(f"Field '{key}' is not a string.")
    return val.strip()


def _string_list(obj: Mapping[str, Any], key: str, not_list_msg: str) -> list[str]:
    val = _require(obj, key)
    if not isinstance(val, list):
        raise TaskValidationError(not_list_msg)
    if not all(isinstance(v, str) for v in val):
        raise TaskValidationError(f"Field '{key}' holds a non-string item.")
    return [v.strip() for v in val if v.strip()]


_LABEL = re.compile(r"^\(?([A-Za-z])\s*[.):]\s*(.*)$", re.S)


def _label_options(options: list[str], letters: str) -> list[str] | None:
    """Options as ``"A. text"``; ``None`` when an option carries a label out of order.

    An option without a label gets the label of its position (the answer letter refers to the
    position, as in CRAFT).
    """
    out = []
    for letter, opt in zip(letters, options):
        m = _LABEL.match(opt)
        if m:
            if m.group(1).upper() != letter:
                return None
            text = m.group(2).strip()
        else:
            text = opt.strip()
        out.append(f"{letter}. {text}")
    return out


def _option_text(option: str) -> str:
    m = _LABEL.match(option)
    return (m.group(2) if m else option).strip().rstrip(".").strip().lower()


def _answer_letter(answer: str, options: list[str], letters: str) -> str | None:
    """The answer's letter: ``"D"``, ``"D."``, ``"D. text"``, ``"(D)"``; or an option's text."""
    a = answer.strip()
    m = re.match(r"^\(?([A-Z])\)?(?![A-Za-z0-9])", a)
    if m and m.group(1) in letters:
        return m.group(1)
    # The answer written as the option's text ("No." for "B. No"): map it to that option.
    text = a.rstrip(".").strip().lower()
    if text:
        hits = [letters[i] for i, o in enumerate(options) if _option_text(o) == text]
        if len(hits) == 1:
            return hits[0]
    return None


def _split_mc_instruction(instruction: str, n_options: int) -> tuple[str, list[str]]:
    """A few-shot's Instruction -> (question, options): trailing labelled lines are options."""
    lines = [ln.strip() for ln in instruction.split("\n") if ln.strip()]
    opts: list[str] = []
    while lines and len(opts) < n_options + 1 and re.match(r"^\(?[A-Z][.):]", lines[-1]):
        opts.insert(0, lines.pop())
    return "\n".join(lines), opts


def _schema_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


# ---------------------------------------------------------------------------------------------
# Quality guards: what a real (small) model gets wrong while the JSON stays valid. Each guard
# raises TaskValidationError with a fixed message, so rejects are counted by reason.

MIN_OPTION_CHARS = 2  # "IgA", "5 mg" are real options; "A", "M" are not

OPTION_ONLY_LETTER = "Option is only a letter label."
OPTION_TOO_SHORT = "Option shorter than {n} characters."
DUPLICATE_OPTIONS = "Duplicate answer options."
QUESTION_CUT_OFF = "Question cut off (no terminal punctuation)."
QUESTION_REPEATS_OPTION = "Question repeats an answer option."
COPIES_DOCUMENT = "{what} copies the document verbatim."

_TERMINAL = tuple("?.!:)\"'”")
_WORDS = re.compile(r"\w+")


def check_options(options: list[str], letters: str, min_chars: int) -> None:
    """Reject options that are only a letter, shorter than ``min_chars`` or duplicated."""
    texts = [_option_text(o) for o in options]
    for t in texts:
        if len(t) == 1 and t.upper() in LETTERS:
            raise TaskValidationError(OPTION_ONLY_LETTER)
        if len(t) < min_chars:
            raise TaskValidationError(OPTION_TOO_SHORT.format(n=min_chars))
    norm = [" ".join(_WORDS.findall(t)) for t in texts]
    if len(set(norm)) < len(norm):
        raise TaskValidationError(DUPLICATE_OPTIONS)


def check_question(question: str, options: list[str]) -> None:
    """Reject a question that stops without terminal punctuation or repeats an option."""
    if not question.rstrip().endswith(_TERMINAL):
        raise TaskValidationError(QUESTION_CUT_OFF)
    q = question.lower()
    labelled = sum(1 for o in options if o.lower() in q)
    texts = [_option_text(o) for o in options]
    if labelled >= 2 or any(t and q.rstrip("?.!: ") == t for t in texts):
        raise TaskValidationError(QUESTION_REPEATS_OPTION)


def copied_fraction(text: str, source: str, n: int = 8) -> float:
    """Share of ``text``'s word ``n``-grams that occur verbatim in ``source`` (0 if too short).

    Lower-cased words, punctuation ignored: a copy with changed spacing or quotes still counts.
    """
    words = _WORDS.findall(text.lower())
    if len(words) < n:
        return 0.0
    src = _WORDS.findall(source.lower())
    src_grams = {tuple(src[i:i + n]) for i in range(len(src) - n + 1)}
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return sum(g in src_grams for g in grams) / len(grams)


def check_not_copied(what: str, text: str, source: str, max_fraction: float) -> None:
    """Reject ``text`` when more than ``max_fraction`` of it is copied from ``source``."""
    if source and copied_fraction(text, source) > max_fraction:
        raise TaskValidationError(COPIES_DOCUMENT.format(what=what))


class MultipleChoiceTask(Task):
    """Multiple-choice QA: ``question``, ``options`` (``"A. ..."``), ``answer`` (a letter).

    ``fixed_options`` (csqa) pins the option texts (``["Yes", "No"]``).
    """

    is_multiple_choice = True
    record_fields = ["question", "options", "answer"]

    def __init__(
        self,
        name: str,
        n_options: int,
        variants: list[PromptVariant],
        *,
        fixed_options: list[str] | None = None,
        question_keys: tuple[str, ...] = ("question",),
        min_question_chars: int = 16,
        min_option_chars: int = MIN_OPTION_CHARS,
        short_question_msg: str = "No question found / below 15 characters.",
        system_prompt: str = "",
        max_new_tokens: int = 1024,
    ) -> None:
        self.name = name
        self.n_options = n_options
        self.letters = LETTERS[:n_options]
        self.variants = variants
        self.fixed_options = fixed_options
        self.question_keys = question_keys
        self.min_question_chars = min_question_chars
        self.min_option_chars = min_option_chars
        self.short_question_msg = short_question_msg
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        letters = self.letters
        if n_options == 2:
            self.answer_msg = f"Answer does not include {letters[0]} or {letters[1]}."
        else:
            self.answer_msg = (
                f"Answer does not include {', '.join(letters[:-1])}, or {letters[-1]}."
            )

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            raise TaskValidationError("Answer is not a JSON object.")
        key = next((k for k in self.question_keys if k in obj), self.question_keys[0])
        question = _string(obj, key)
        options = _string_list(obj, "options", "Options not in list format.")
        answer_raw = _require(obj, "answer")
        if len(question) < self.min_question_chars:
            raise TaskValidationError(self.short_question_msg)
        if len(options) != self.n_options:
            raise TaskValidationError(f"Number of answer options other than {self.n_options}.")
        labelled = _label_options(options, self.letters)
        if labelled is None:
            raise TaskValidationError(
                f"Options not labelled {', '.join(self.letters)} in order."
            )
        if self.fixed_options is not None:
            if [_option_text(o) for o in labelled] != [o.lower() for o in self.fixed_options]:
                expected = [f"{ltr}. {o}" for ltr, o in zip(self.letters, self.fixed_options)]
                raise TaskValidationError(f"Options are not {expected}.")
            labelled = [f"{ltr}. {o}" for ltr, o in zip(self.letters, self.fixed_options)]
        else:
            check_options(labelled, self.letters, self.min_option_chars)
        if not isinstance(answer_raw, str):
            raise TaskValidationError(self.answer_msg)
        letter = _answer_letter(answer_raw, labelled, self.letters)
        if letter is None:  # e.g. "E" of four options: CRAFT's message names the letters
            raise TaskValidationError(self.answer_msg)
        check_question(question, labelled)
        return {"question": question, "options": labelled, "answer": letter}

    def sample_text(self, record: Mapping[str, Any]) -> str:
        return f"{record['question']}\n" + "\n".join(record["options"]) + (
            f"\nAnswer: {record['answer']}"
        )

    def training_pair(self, record: Mapping[str, Any]) -> tuple[str, str]:
        # CRAFT finetune_format: "question\nA. ..\nB. .." -> the answer letter.
        return record["question"] + "\n" + "\n".join(record["options"]), record["answer"]

    def mc_letters(self, record: Mapping[str, Any]) -> list[str]:
        return list(LETTERS[: len(record["options"])])

    def convert_fewshot(self, shot: FewShot) -> tuple[dict[str, Any], list[str]]:
        notes: list[str] = []
        question, options = _split_mc_instruction(shot.instruction, self.n_options)
        if len(options) != self.n_options:
            notes.append(
                f"Instruction holds {len(options)} labelled option lines, "
                f"expected {self.n_options}"
            )
        output = shot.output.strip()
        letter = _answer_letter(output, options, self.letters)
        if letter is not None and not re.match(r"^\(?[A-Z]\)?(?![A-Za-z0-9])", output):
            notes.append(
                f"Output {output!r} is an option's text, not a letter label; read as {letter!r}"
            )
        raw = {"question": question, "options": options, "answer": letter or output}
        return self._finish_fewshot(raw, notes)


class RecipeTask(Task):
    """RecipeGen: ``instruction``, ``ingredients`` (list, >= 2), ``steps`` (list, >= 2)."""

    record_fields = ["instruction", "ingredients", "steps"]

    def __init__(self, *, min_instruction_chars: int = 16, min_items: int = 2,
                 max_copied_fraction: float = 0.6) -> None:
        self.name = "recipegen"
        self.min_instruction_chars = min_instruction_chars
        self.min_items = min_items
        self.max_copied_fraction = max_copied_fraction
        self.system_prompt = SYSTEM_PROMPTS["recipegen"]
        self.max_new_tokens = CRAFT_MAX_NEW_TOKENS["recipegen"]
        item = {"type": "string", "minLength": 1}
        self.variants = [PromptVariant("default", RECIPEGEN_INSTRUCTION, _schema_object({
            "instruction": {"type": "string", "minLength": min_instruction_chars},
            "ingredients": {"type": "array", "items": item, "minItems": min_items},
            "steps": {"type": "array", "items": item, "minItems": min_items},
        }))]

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            raise TaskValidationError("Answer is not a JSON object.")
        instruction = _string(obj, "instruction")
        ingredients = _string_list(obj, "ingredients", "Ingredients not in list format.")
        steps = _string_list(obj, "steps", "Steps not in list format.")
        if len(instruction) < self.min_instruction_chars:
            raise TaskValidationError("No instruction found / below 15 characters.")
        if len(ingredients) < self.min_items:
            raise TaskValidationError("One or no ingredient found.")
        if len(steps) < self.min_items:
            raise TaskValidationError("One or no cooking step found.")
        return {"instruction": instruction, "ingredients": ingredients, "steps": steps}

    def check_source(self, record: Mapping[str, Any], source: str) -> None:
        check_not_copied("Recipe", "\n".join(record["steps"]), source, self.max_copied_fraction)

    @staticmethod
    def _body(record: Mapping[str, Any]) -> str:
        return (
            "Ingredients:\n" + "\n".join(record["ingredients"])
            + "\nSteps:\n" + "\n".join(record["steps"])
        )

    def sample_text(self, record: Mapping[str, Any]) -> str:
        return record["instruction"] + "\n" + self._body(record)

    def training_pair(self, record: Mapping[str, Any]) -> tuple[str, str]:
        return record["instruction"], self._body(record)

    def convert_fewshot(self, shot: FewShot) -> tuple[dict[str, Any], list[str]]:
        notes: list[str] = []
        lines = shot.output.split("\n")
        # Split on the first line that is exactly "Steps:" -- not on the substring, which
        # also occurs inside sub-headings ("Stirring Steps:").
        idx = next((i for i, ln in enumerate(lines) if ln.strip().lower() == "steps:"), None)
        if idx is None:
            notes.append("Output has no 'Steps:' line; all of it read as steps")
            head, tail = [], lines
        else:
            head, tail = lines[:idx], lines[idx + 1:]
            if sum("steps:" in ln.lower() for ln in lines) > 1:
                notes.append("'Steps:' also occurs inside other lines; split on the "
                             "standalone 'Steps:' line")
        head = [ln.strip() for ln in head if ln.strip()]
        if head and head[0].lower().endswith("ingredients:"):
            if head[0] != "Ingredients:":
                notes.append(f"first line is {head[0]!r}, not 'Ingredients:'; dropped as header")
            head = head[1:]
        elif idx is not None:
            notes.append("Output does not start with an 'Ingredients:' line")
        raw = {
            "instruction": shot.instruction.strip(),
            "ingredients": head,
            "steps": [ln.strip() for ln in tail if ln.strip()],
        }
        return self._finish_fewshot(raw, notes)


class SummarizationTask(Task):
    """Summarization: ``instruction``, ``summary`` (>= 100 chars), ``long_but_clean_text``
    (>= 500 chars)."""

    record_fields = ["instruction", "summary", "long_but_clean_text"]

    def __init__(
        self, *, min_instruction_chars: int = 16, min_summary_chars: int = 100,
        min_text_chars: int = 500, max_copied_fraction: float = 0.6,
    ) -> None:
        self.name = "summarization"
        self.max_copied_fraction = max_copied_fraction
        self.min_instruction_chars = min_instruction_chars
        self.min_summary_chars = min_summary_chars
        self.min_text_chars = min_text_chars
        self.system_prompt = SYSTEM_PROMPTS["summarization"]
        self.max_new_tokens = CRAFT_MAX_NEW_TOKENS["summarization"]
        self.variants = [PromptVariant("default", SUMMARIZATION_INSTRUCTION, _schema_object({
            "instruction": {"type": "string", "minLength": min_instruction_chars},
            "summary": {"type": "string", "minLength": min_summary_chars},
            "long_but_clean_text": {"type": "string", "minLength": min_text_chars},
        }))]

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            raise TaskValidationError("Answer is not a JSON object.")
        instruction = _string(obj, "instruction")
        summary = _string(obj, "summary")
        text = _string(obj, "long_but_clean_text")
        if len(instruction) < self.min_instruction_chars:
            raise TaskValidationError("Instruction shorter than 15 characters.")
        if len(summary) < self.min_summary_chars:
            raise TaskValidationError(
                f"Summary shorter than {self.min_summary_chars} characters."
            )
        if len(text) < self.min_text_chars:
            raise TaskValidationError(
                f"Long but clean text shorter than {self.min_text_chars} characters."
            )
        return {"instruction": instruction, "summary": summary, "long_but_clean_text": text}

    def check_source(self, record: Mapping[str, Any], source: str) -> None:
        # Only the summary: long_but_clean_text is meant to keep the document's wording.
        check_not_copied("Summary", record["summary"], source, self.max_copied_fraction)

    def sample_text(self, record: Mapping[str, Any]) -> str:
        return f"{record['instruction']}\n{record['long_but_clean_text']}\n{record['summary']}"

    def training_pair(self, record: Mapping[str, Any]) -> tuple[str, str]:
        return f"{record['instruction']}\n{record['long_but_clean_text']}", record["summary"]

    def convert_fewshot(self, shot: FewShot) -> tuple[dict[str, Any], list[str]]:
        # CRAFT: the Instruction's first line is the instruction, the rest is the text.
        parts = [p.strip() for p in shot.instruction.split("\n") if p.strip()]
        notes: list[str] = []
        if len(parts) < 2:
            notes.append("Instruction has no text after its first line")
        raw = {
            "instruction": parts[0] if parts else "",
            "summary": shot.output.strip(),
            "long_but_clean_text": "\n".join(parts[1:]),
        }
        return self._finish_fewshot(raw, notes)


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
            schema = _schema_object({f.name: self._field_schema(f) for f in cfg.fields})
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
                items = _string_list(obj, f.name, f"Field '{f.name}' not in list format.")
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
                val = _string(obj, f.name)
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


# ---------------------------------------------------------------------------------------------
# Look-up


def _mc_schema(n: int, question_key: str, fixed: list[str] | None) -> dict[str, Any]:
    letters = LETTERS[:n]
    if fixed is not None:
        options: dict[str, Any] = {
            "type": "array", "prefixItems": [
                {"type": "string", "enum": [f"{ltr}. {o}"]} for ltr, o in zip(letters, fixed)
            ], "items": False, "minItems": n, "maxItems": n,
        }
    else:
        options = {
            "type": "array",
            "prefixItems": [
                # "A. " plus MIN_OPTION_CHARS or more. Patterns match the whole string (xgrammar,
                # which also ignores minLength beside a pattern): "^A\. \S" allowed one letter.
                {"type": "string", "pattern": f"^{ltr}\\. \\S.{{{MIN_OPTION_CHARS - 1},}}$"}
                for ltr in letters
            ],
            "items": False, "minItems": n, "maxItems": n,
        }
    return _schema_object({
        # 16+ characters ending as a sentence ends: a question cannot stop mid-way
        question_key: {"type": "string", "pattern": "^\\S.{14,}[?.!:]$"},
        "options": options,
        "answer": {"type": "string", "enum": list(letters)},
    })


def builtin_task(name: str) -> Task:
    """One of the five CRAFT tasks by name."""
    if name in ("bioqa", "medqa"):
        return MultipleChoiceTask(
            name, 4, [PromptVariant("default", QA_MC_INSTRUCTION,
                                    _mc_schema(4, "question", None))],
            system_prompt=SYSTEM_PROMPTS[name], max_new_tokens=CRAFT_MAX_NEW_TOKENS[name],
        )
    if name == "csqa":
        yes_no = ["Yes", "No"]
        return MultipleChoiceTask(
            "csqa", 2,
            [
                PromptVariant("question", QA_YN_INSTRUCTION_Q, _mc_schema(2, "question", yes_no)),
                PromptVariant("statement", QA_YN_INSTRUCTION_S,
                              _mc_schema(2, "statement", yes_no),
                              renames=(("question", "statement"),)),
            ],
            fixed_options=yes_no,
            question_keys=("question", "statement"),
            short_question_msg="No question or statement found / shorter than 15 characters.",
            system_prompt=SYSTEM_PROMPTS["csqa"], max_new_tokens=CRAFT_MAX_NEW_TOKENS["csqa"],
        )
    if name == "recipegen":
        return RecipeTask()
    if name == "summarization":
        return SummarizationTask()
    raise TaskError(
        f"unknown task {name!r}; built-in tasks are {list(BUILTIN_TASKS)}, or define a custom "
        "task in the config (name, meta_instruction, fields or json_schema)"
    )


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
