"""The built-in tasks: multiple choice (QA), recipe generation, summarisation."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from craft_ray.tasks.base import (
    BUILTIN_TASKS,
    CRAFT_MAX_NEW_TOKENS,
    LETTERS,
    QA_MC_INSTRUCTION,
    QA_YN_INSTRUCTION_Q,
    QA_YN_INSTRUCTION_S,
    RECIPEGEN_INSTRUCTION,
    SUMMARIZATION_INSTRUCTION,
    SYSTEM_PROMPTS,
    PromptVariant,
    Task,
    TaskError,
    TaskValidationError,
    require_field,
    schema_object,
    string_field,
    string_list_field,
)
from craft_ray.tasks.fewshots import FewShot
from craft_ray.tasks.quality import (
    MIN_OPTION_CHARS,
    check_not_copied,
    check_options,
    check_question,
)

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
        question = string_field(obj, key)
        options = string_list_field(obj, "options", "Options not in list format.")
        answer_raw = require_field(obj, "answer")
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
            check_options([_option_text(o) for o in labelled], self.min_option_chars)
        if not isinstance(answer_raw, str):
            raise TaskValidationError(self.answer_msg)
        letter = _answer_letter(answer_raw, labelled, self.letters)
        if letter is None:  # e.g. "E" of four options: CRAFT's message names the letters
            raise TaskValidationError(self.answer_msg)
        check_question(question, labelled, [_option_text(o) for o in labelled])
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
        self.variants = [PromptVariant("default", RECIPEGEN_INSTRUCTION, schema_object({
            "instruction": {"type": "string", "minLength": min_instruction_chars},
            "ingredients": {"type": "array", "items": item, "minItems": min_items},
            "steps": {"type": "array", "items": item, "minItems": min_items},
        }))]

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            raise TaskValidationError("Answer is not a JSON object.")
        instruction = string_field(obj, "instruction")
        ingredients = string_list_field(obj, "ingredients", "Ingredients not in list format.")
        steps = string_list_field(obj, "steps", "Steps not in list format.")
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
        self.variants = [PromptVariant("default", SUMMARIZATION_INSTRUCTION, schema_object({
            "instruction": {"type": "string", "minLength": min_instruction_chars},
            "summary": {"type": "string", "minLength": min_summary_chars},
            "long_but_clean_text": {"type": "string", "minLength": min_text_chars},
        }))]

    def validate(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(obj, Mapping):
            raise TaskValidationError("Answer is not a JSON object.")
        instruction = string_field(obj, "instruction")
        summary = string_field(obj, "summary")
        text = string_field(obj, "long_but_clean_text")
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
    return schema_object({
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
