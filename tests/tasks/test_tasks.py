"""Task definitions: parsing and validation on realistic outputs, few-shot conversion, forms."""

from __future__ import annotations

import json

import pytest

from craft_ray.tasks.base import BUILTIN_TASKS, TaskError, TaskValidationError, iter_json_objects
from craft_ray.tasks.custom import CustomTaskConfig
from craft_ray.tasks.fewshots import FewShotConfig, load_fewshots
from craft_ray.tasks.registry import get_task
from tests.conftest import FIXTURES, shared_data

GEN = FIXTURES / "generate"

MC = {
    "question": "Which enzyme converts starch into maltose during mashing?",
    "options": ["A. Beta-amylase", "B. Lipase", "C. Protease", "D. Invertase"],
    "answer": "A",
}
YN_Q = {"question": "Does a darker roast always contain more caffeine?",
        "options": ["A. Yes", "B. No"], "answer": "B"}
YN_S = {"statement": "Cold brew coffee is steeped for many hours.",
        "options": ["A. Yes", "B. No"], "answer": "A"}
RECIPE = {
    "instruction": "Make a simple cold brew coffee concentrate at home.",
    "ingredients": ["100 g coarsely ground coffee", "1 l cold water"],
    "steps": ["Mix coffee and water in a jar.", "Steep 12 hours, then strain."],
}
SUMMARY = {
    "instruction": "Summarize the following forum answer.",
    "summary": "Grind coarse, steep the coffee in cold water for twelve to eighteen hours, strain "
    "it twice and dilute the concentrate one to one with water or milk.",
    "long_but_clean_text": " ".join(["Cold brew needs a coarse grind so that the water can "
                                      "extract flavour slowly without bitterness."] * 8),
}
VALID = {"bioqa": MC, "medqa": MC, "csqa": YN_Q, "recipegen": RECIPE, "summarization": SUMMARY}


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_valid_json_in_every_wrapping(name):
    task = get_task(name)
    obj = VALID[name]
    js = json.dumps(obj)
    expected = task.validate(obj)
    assert list(expected) == task.record_fields
    wrappings = [
        js,
        f"Sure! Here is the sample you asked for:\n{js}\nI hope this helps.",
        f"```json\n{json.dumps(obj, indent=2)}\n```",
        f"Some {{broken prose}} first. {js} and a second {js}",
    ]
    for text in wrappings:
        assert task.parse(text) == expected


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_failures_have_exact_reasons(name):
    task = get_task(name)
    js = json.dumps(VALID[name])
    with pytest.raises(TaskValidationError, match=r"^Malformed or truncated JSON\.$"):
        task.parse(js[: len(js) // 2])  # generation cut off by max_new_tokens
    with pytest.raises(TaskValidationError, match=r"^No JSON found\.$"):
        task.parse("I cannot answer this question based on the text.")
    with pytest.raises(TaskValidationError, match=r"^Empty generation\.$"):
        task.parse("  \n")
    first = task.record_fields[0]
    missing = {k: v for k, v in VALID[name].items() if k != first}
    with pytest.raises(TaskValidationError, match=rf"^Missing field '{first}'\.$"):
        task.parse(json.dumps(missing))


@pytest.mark.parametrize("name,n", [("bioqa", 4), ("medqa", 4), ("csqa", 2)])
def test_multiple_choice_rules(name, n):
    task = get_task(name)
    good = VALID[name]
    three = dict(good, options=good["options"][:-1])
    with pytest.raises(TaskValidationError, match=rf"^Number of answer options other than {n}\.$"):
        task.parse(json.dumps(three))
    bad_letter = dict(good, answer="E" if n == 4 else "C")
    msg = ("Answer does not include A, B, C, or D." if n == 4
           else "Answer does not include A or B.")
    with pytest.raises(TaskValidationError) as ei:
        task.parse(json.dumps(bad_letter))
    assert str(ei.value) == msg
    short = dict(good, question="Why?")
    with pytest.raises(TaskValidationError, match="15 characters"):
        task.parse(json.dumps(short))
    # answer written as "B." or "B. text" is read as the letter (CRAFT reads answer[0])
    assert task.parse(json.dumps(dict(good, answer="B. whatever")))["answer"] == "B"
    assert task.mc_letters(task.validate(good)) == list("ABCD"[:n])


def test_mc_options_are_labelled_and_checked():
    task = get_task("bioqa")
    unlabelled = dict(MC, options=["Beta-amylase", "Lipase", "Protease", "Invertase"])
    assert task.validate(unlabelled)["options"] == MC["options"]
    paren = dict(MC, options=["A) Beta-amylase", "B) Lipase", "C) Protease", "D) Invertase"])
    assert task.validate(paren)["options"] == MC["options"]
    shuffled = dict(MC, options=["B. Lipase", "A. Beta-amylase", "C. Protease", "D. Invertase"])
    with pytest.raises(TaskValidationError, match=r"^Options not labelled A, B, C, D in order\.$"):
        task.validate(shuffled)
    # the answer given as an option's text maps to that option
    assert task.validate(dict(MC, answer="Lipase"))["answer"] == "B"
    with pytest.raises(TaskValidationError, match="^Options not in list format"):
        task.validate(dict(MC, options="A. x B. y"))


def test_csqa_statement_variant_and_fixed_options():
    task = get_task("csqa")
    assert [v.name for v in task.variants] == ["question", "statement"]
    rec = task.parse("Output: " + json.dumps(YN_S))
    assert rec == {"question": YN_S["statement"], "options": ["A. Yes", "B. No"], "answer": "A"}
    with pytest.raises(TaskValidationError, match=r"^Options are not \['A. Yes', 'B. No'\]\.$"):
        task.validate(dict(YN_Q, options=["A. True", "B. False"]))
    assert task.validate(dict(YN_Q, answer="No"))["answer"] == "B"
    # a statement few-shot is shown with the variant's key
    shown = json.loads(task.variant("statement").to_answer_json(rec))
    assert list(shown) == ["statement", "options", "answer"]
    assert "statement" in task.output_schema("statement")["required"]


def test_recipe_rules():
    task = get_task("recipegen")
    with pytest.raises(TaskValidationError, match=r"^One or no ingredient found\.$"):
        task.validate(dict(RECIPE, ingredients=["coffee"]))
    with pytest.raises(TaskValidationError, match=r"^One or no cooking step found\.$"):
        task.validate(dict(RECIPE, steps=["Mix.", "  "]))
    with pytest.raises(TaskValidationError, match=r"^Ingredients not in list format\.$"):
        task.validate(dict(RECIPE, ingredients="coffee, water"))
    with pytest.raises(TaskValidationError, match=r"^No instruction found / below 15 char"):
        task.validate(dict(RECIPE, instruction="Cook."))
    prompt, completion = task.training_pair(task.validate(RECIPE))
    assert prompt == RECIPE["instruction"]
    assert completion.startswith("Ingredients:\n100 g") and "\nSteps:\nMix coffee" in completion


def test_summarization_rules():
    task = get_task("summarization")
    with pytest.raises(TaskValidationError, match=r"^Summary shorter than 100 characters\.$"):
        task.validate(dict(SUMMARY, summary="Too short."))
    with pytest.raises(TaskValidationError,
                       match=r"^Long but clean text shorter than 500 characters\.$"):
        task.validate(dict(SUMMARY, long_but_clean_text="x" * 499))
    prompt, completion = task.training_pair(task.validate(SUMMARY))
    assert prompt.startswith(SUMMARY["instruction"] + "\n") and completion == SUMMARY["summary"]


def test_iter_json_objects_skips_nested_and_broken():
    text = 'a {"x": {"y": 1}} b {broken c {"z": 2}'
    assert iter_json_objects(text) == [{"x": {"y": 1}}, {"z": 2}]


def test_forms_are_strings_without_template():
    for name in BUILTIN_TASKS:
        task = get_task(name)
        rec = task.validate(VALID[name])
        p, c = task.training_pair(rec)
        assert p and c and "[INST]" not in p
        st = task.sample_text(rec)
        assert rec[task.record_fields[0]] in st
    with pytest.raises(TaskError, match="not a multiple-choice task"):
        get_task("recipegen").mc_letters(RECIPE)


def test_unknown_task_names_the_builtins():
    with pytest.raises(TaskError, match="bioqa"):
        get_task("bioq")


# --- few-shots ---------------------------------------------------------------------------


def _shots(path):
    return load_fewshots(FewShotConfig(path=str(path)))


def test_fewshot_quirks_are_repaired_and_reported():
    csqa = get_task("csqa")
    shots = _shots(GEN / "csqa_quirk.jsonl")
    assert shots[1].output == "No."  # CRAFT's csqa few-shot line 19
    rec, notes = csqa.convert_fewshot(shots[1])
    assert rec["answer"] == "B" and rec["options"] == ["A. Yes", "B. No"]
    assert any("'No.'" in n for n in notes)
    assert csqa.convert_fewshot(shots[0])[1] == []

    recipe = get_task("recipegen")
    shots = _shots(GEN / "recipegen_quirk.jsonl")
    rec, notes = recipe.convert_fewshot(shots[1])  # CRAFT's recipegen line 3
    assert any("Base Ingredients:" in n for n in notes)
    assert rec["ingredients"][0] == "* Fresh organic milk"
    # the split is on the standalone "Steps:" line, so the later sections stay in the steps
    assert any("strawberry" in s.lower() for s in rec["steps"])
    assert not any("Stirring" in i for i in rec["ingredients"])

    summ = get_task("summarization")
    shots = _shots(GEN / "summarization.jsonl")
    rec, notes = summ.convert_fewshot(shots[1])  # a human summary of 94 characters: kept
    assert len(rec["summary"]) < 100 and "Summary shorter than 100" in notes[0]
    rec, notes = summ.convert_fewshot(shots[0])
    assert notes == [] and rec["instruction"] == "Write a TLDR for the following text."


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_all_shared_fewshots_convert(name):
    task = get_task(name)
    shots = _shots(shared_data(f"craft-fewshots/{name}.jsonl"))
    quirky = []
    for shot in shots:
        rec, notes = task.convert_fewshot(shot)
        assert list(rec) == task.record_fields
        if notes:
            quirky.append(shot.id)
    # the known quirks, and no others: csqa line 19, recipegen line 3, two short summaries
    expected = {"bioqa": [], "medqa": [], "csqa": ["csqa:18"], "recipegen": ["recipegen:2"],
                "summarization": ["summarization:10", "summarization:26"]}
    assert quirky == expected[name]


# --- custom tasks ------------------------------------------------------------------------


def test_custom_task_from_field_list(tmp_path):
    spec = {
        "name": "faq",
        "meta_instruction": "Read the text. Write one FAQ entry as JSON "
                            '{"question": ..., "answer": ..., "tags": [...]}',
        "fields": [{"name": "question", "min_chars": 10}, {"name": "answer", "min_chars": 20},
                   {"name": "tags", "type": "list", "min_items": 1}],
        "fewshot_fields": {"question": "{Instruction}", "answer": "{Output}", "tags": "{Tags}"},
        "training_prompt": "{question}",
        "training_completion": "{answer}",
    }
    task = get_task(spec)
    assert task.record_fields == ["question", "answer", "tags"]
    good = {"question": "How fine should I grind?", "answer": "Medium-fine for a pour-over.",
            "tags": ["grind"]}
    assert task.parse("```\n" + json.dumps(good) + "\n```") == good
    with pytest.raises(TaskValidationError, match=r"^Field 'answer' shorter than 20 characters"):
        task.validate(dict(good, answer="Fine."))
    with pytest.raises(TaskValidationError, match=r"^Field 'tags' has fewer than 1 items\.$"):
        task.validate(dict(good, tags=[]))
    assert task.training_pair(good) == (good["question"], good["answer"])
    f = tmp_path / "faq.jsonl"
    f.write_text(json.dumps({"Text": "t", "Instruction": "How fine should I grind?",
                             "Output": "Medium-fine for a pour-over brewer.",
                             "Tags": "grind\nbrewing"}) + "\n")
    rec, notes = task.convert_fewshot(_shots(f)[0])
    assert rec["tags"] == ["grind", "brewing"] and notes == []
    assert task.output_schema()["required"] == ["question", "answer", "tags"]


def test_custom_task_from_json_schema():
    cfg = CustomTaskConfig(
        name="rating",
        meta_instruction="Rate the review as JSON.",
        json_schema={"type": "object", "required": ["review", "stars"],
                     "properties": {"review": {"type": "string", "minLength": 5},
                                    "stars": {"type": "integer", "minimum": 1, "maximum": 5}}},
    )
    task = get_task(cfg)
    assert task.parse('{"review": "Great beer", "stars": 5}') == {"review": "Great beer",
                                                                 "stars": 5}
    with pytest.raises(TaskValidationError, match=r"^Schema violation at stars: 9 is greater"):
        task.validate({"review": "Great beer", "stars": 9})


def test_custom_task_config_errors():
    with pytest.raises(TaskError, match="exactly one of 'fields'"):
        get_task({"name": "x", "meta_instruction": "m"})
    with pytest.raises(TaskError, match="unknown field"):
        get_task({"name": "x", "meta_instruction": "m", "fields": [{"name": "a"}],
                  "training_prompt": "{b}"})
    with pytest.raises(TaskError, match="json_schema is not valid"):
        get_task({"name": "x", "meta_instruction": "m",
                  "json_schema": {"type": "object", "properties": {"a": {"type": 3}}}})
