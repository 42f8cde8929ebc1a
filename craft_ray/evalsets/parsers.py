"""One parser per eval set: a raw row to an EvalItem or GenItem, or a RowError."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from craft_ray.evalsets.base import (
    CNN_INSTRUCTION,
    LETTERS,
    RECIPE_INSTRUCTION,
    EvalItem,
    GenItem,
    RowError,
)

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


PARSERS: dict[str, Callable[..., EvalItem | GenItem]] = {
    "commonsenseqa": parse_commonsenseqa,
    "medqa": parse_medqa,
    "scienceqa_bio": parse_scienceqa,
    "medmcqa": parse_medmcqa,
    "csqa2": parse_csqa2,
    "cnn_dailymail": parse_cnn_dailymail,
    "recipenlg": parse_recipenlg,
}


def row_filter(name: str) -> Callable[[dict[str, Any]], bool] | None:
    if name == "scienceqa_bio":  # CRAFT's bioqa: ScienceQA test, biology only
        return lambda obj: obj.get("topic") == "biology"
    return None
