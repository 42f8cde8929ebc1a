"""Quality guards of the built-in tasks: degenerate samples a real small model writes while its
JSON stays valid are rejected, each with its own reason; the guided schemas ask for the same."""

from __future__ import annotations

import json

import jsonschema
import pytest

from craft_ray.stages.generate.parse import parse_batch, parse_row, source_document
from craft_ray.stages.generate.prompts import SEPARATOR
from craft_ray.tasks import TaskValidationError, get_task
from craft_ray.tasks.quality import (
    DUPLICATE_OPTIONS,
    NEAR_DUPLICATE_OPTIONS,
    OPTION_ONLY_LETTER,
    QUESTION_CUT_OFF,
    QUESTION_REPEATS_OPTION,
    copied_fraction,
)

GOOD = {
    "question": "Which enzyme converts starch into maltose during mashing?",
    "options": ["A. Beta-amylase", "B. Lipase", "C. Protease", "D. Invertase"],
    "answer": "A",
}

# Degenerate samples seen from SmolLM2-135M-Instruct (issue 14), each with its reason.
DEGENERATE = [
    (dict(GOOD, options=["A. A", "B. B", "C. C", "D. D"]), OPTION_ONLY_LETTER),
    (dict(GOOD, options=["A. M", "B. M", "C. M", "D. M"]), OPTION_ONLY_LETTER),
    (dict(GOOD, options=["A. 5", "B. 7", "C. 9", "D. 1"]), "Option shorter than 2 characters."),
    (dict(GOOD, options=["A. Hops", "B. Malt", "C. hops.", "D. Yeast"]), DUPLICATE_OPTIONS),
    # seen in the demo: C and D say the same thing
    (dict(GOOD, options=["A. Any and all", "B. None of these",
                         "C. Some people do use bitters for health purposes",
                         "D. Some people use bitters for health purposes"]),
     NEAR_DUPLICATE_OPTIONS),
    (dict(GOOD, question="Which of the following statements about the pathophysiology,"),
     QUESTION_CUT_OFF),
    (dict(GOOD, question="What is the best way to treat a wound while on antibio"),
     QUESTION_CUT_OFF),
    (dict(GOOD, question="Which enzyme: A. Beta-amylase, B. Lipase, C. Protease or D. Invertase?"),
     QUESTION_REPEATS_OPTION),
    (dict(GOOD, answer="E"), "Answer does not include A, B, C, or D."),
    # seen in the quiet demo run of session 6: the question is only an option's term
    ({"question": "What does bottom fermented?", "options": [
        "A. Bottom fermented", "B. Top fermented", "C. Bottom fermenting yeast",
        "D. Top fermentation yeast"], "answer": "C"}, QUESTION_REPEATS_OPTION),
    ({"question": "What is a heracleum?", "options": [
        "A. Heracleum", "B. Cow Parsnip", "C. Floral Cypress", "D. Heracleum Dulce"],
      "answer": "C"}, QUESTION_REPEATS_OPTION),
]


@pytest.mark.parametrize("obj,reason", DEGENERATE)
def test_mc_degenerate_samples_rejected_with_reason(obj, reason):
    task = get_task("medqa")
    with pytest.raises(TaskValidationError) as ei:
        task.validate(obj)
    assert str(ei.value) == reason
    assert parse_row(task, json.dumps(obj), "stop", "") == (None, reason, "")


def test_mc_good_sample_and_short_real_options_pass():
    task = get_task("bioqa")
    assert task.validate(GOOD)["answer"] == "A"
    short_real = dict(GOOD, options=["A. IgA", "B. IgE", "C. 5 mg", "D. pH"])
    assert task.validate(short_real)["options"][0] == "A. IgA"
    # options one content word apart are different answers, not near duplicates
    close = dict(GOOD, options=["A. Increased insulin", "B. Decreased insulin",
                                "C. Increased glucagon", "D. No change"])
    assert task.validate(close)["options"][1] == "B. Decreased insulin"
    # csqa: fixed Yes/No options are not "too short"; a statement ends with a full stop
    csqa = get_task("csqa")
    assert csqa.validate({"statement": "Cold brew coffee is steeped for many hours.",
                          "options": ["A. Yes", "B. No"], "answer": "A"})["answer"] == "A"


def test_human_questions_do_not_trip_the_question_guard():
    """The bundled human-written questions (60 MedQA, 100 CommonsenseQA) all pass
    check_question: the guard rejects what the model gets wrong, not real questions."""
    from pathlib import Path

    from craft_ray.tasks.quality import check_question

    root = Path(__file__).resolve().parents[2]
    medqa = [json.loads(x) for x in
             (root / "data/eval/medqa_usmle_4opt_test_first60.jsonl").read_text().splitlines()]
    csqa = [json.loads(x) for x in (root / "tests/fixtures/eval/"
                                    "commonsenseqa_dev_first100.jsonl").read_text().splitlines()]
    items = [(r["question"], [f"{k}. {v}" for k, v in r["options"].items()]) for r in medqa]
    items += [(r["question"]["stem"], [f"{c['label']}. {c['text']}"
                                       for c in r["question"]["choices"]]) for r in csqa]
    assert len(items) == 160
    for question, labelled in items:
        check_question(question, labelled, [o[3:].lower() for o in labelled])


@pytest.mark.parametrize("name", ["bioqa", "medqa", "csqa"])
def test_mc_schema_asks_what_the_validator_demands(name):
    """The guided schema refuses what the validator refuses: one-letter options, a question
    without terminal punctuation (patterns match the whole string, as xgrammar applies them)."""
    task = get_task(name)
    schema = task.output_schema()
    good = GOOD if name != "csqa" else {"question": "Does a darker roast hold more caffeine?",
                                        "options": ["A. Yes", "B. No"], "answer": "B"}
    jsonschema.validate(good, schema)
    cut = dict(good, question="Which enzyme converts starch into maltose during")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cut, schema)
    if name != "csqa":
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(dict(GOOD, options=["A. A", "B. B", "C. C", "D. D"]), schema)
    assert "maxLength" not in json.dumps(schema)  # nothing caps (cuts) a question


def test_mc_schema_patterns_compile_in_xgrammar(tiny_causal_lm):
    """xgrammar matches a pattern against the whole string: "A. B" is refused, "A. Beer" ok."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from craft_ray.backends.hf import compile_schema

    tok = AutoTokenizer.from_pretrained(tiny_causal_lm)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok))
    grammar = compile_schema(compiler, json.dumps(get_task("medqa").output_schema()))

    def accepts(obj: dict) -> bool:
        m = xgr.GrammarMatcher(grammar)
        return m.accept_string(json.dumps(obj)) and m.accept_token(tok.eos_token_id)

    assert accepts(GOOD)
    assert not accepts(dict(GOOD, options=["A. A", "B. Lipase", "C. Protease", "D. Invertase"]))
    assert not accepts(dict(GOOD, question="Which enzyme converts starch into"))


DOC = ("To make a cold brew, grind the coffee coarse and put it in a large jar. Pour cold water "
       "over the grounds, stir well and leave the jar in the fridge for about eighteen hours. "
       "Strain the coffee twice through a paper filter, then dilute the concentrate one to one "
       "with water or milk and serve it over ice with a little sugar if you like.")


def test_copied_fraction():
    assert copied_fraction(DOC, DOC) == 1.0
    assert copied_fraction("Short text.", DOC) == 0.0  # fewer words than one n-gram
    own = ("Coarse coffee steeps overnight in cold water; after straining, the strong "
           "concentrate is thinned with milk and poured over ice.")
    assert copied_fraction(own, DOC) == 0.0


def test_summary_and_recipe_copying_the_document_rejected():
    summ = get_task("summarization")
    rec = {"instruction": "Summarize the following answer about cold brew coffee.",
           "summary": DOC[:220], "long_but_clean_text": DOC * 2}
    with pytest.raises(TaskValidationError, match="^Summary copies the document verbatim.$"):
        summ.parse(json.dumps(rec), DOC)
    own = dict(rec, summary="Cold brew: coarse grounds steep in cold water for most of a day, "
               "are strained twice and the concentrate is thinned with milk or water.")
    assert summ.parse(json.dumps(own), DOC)["summary"] == own["summary"]
    assert summ.parse(json.dumps(rec))["summary"] == rec["summary"]  # no source: no rule

    recipe = get_task("recipegen")
    copied = {"instruction": "Make a cold brew coffee concentrate at home.",
              "ingredients": ["coarse coffee", "cold water"],
              "steps": [s.strip() + "." for s in DOC.split(".") if s.strip()]}
    with pytest.raises(TaskValidationError, match="^Recipe copies the document verbatim.$"):
        recipe.parse(json.dumps(copied), DOC)
    written = dict(copied, steps=["Grind 100 g of beans coarsely.", "Steep them in 1 l of cold "
                                  "water for 18 hours.", "Strain twice and dilute 1:1."])
    assert recipe.parse(json.dumps(written), DOC)["steps"] == written["steps"]


def test_parse_batch_reads_the_source_document_from_the_prompt():
    import pyarrow as pa

    msgs = [{"role": "user", "content": "Meta." + SEPARATOR + "few-shot text"},
            {"role": "assistant", "content": "{}"},
            {"role": "user", "content": "Meta." + SEPARATOR + DOC}]
    assert source_document(json.dumps(msgs)) == DOC
    rec = {"instruction": "Summarize the following answer about cold brew coffee.",
           "summary": DOC[:220], "long_but_clean_text": DOC * 2}
    batch = pa.Table.from_pylist([{
        "sample_id": "d#0@0", "text": json.dumps(rec), "finish_reason": "stop", "error": "",
        "messages": json.dumps(msgs)}])
    out = parse_batch(batch, "summarization").to_pylist()[0]
    assert out["status"] == "reject"
    assert out["reject_reason"] == "Summary copies the document verbatim."
