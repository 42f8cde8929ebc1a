"""Eval-set loaders on fixtures in each set's original schema, malformed rows included."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from craft_ray.evalsets.base import HUB_DEFAULTS, EvalSetConfig, EvalSetError
from craft_ray.evalsets.loading import gold_distribution, load_eval_set
from tests.conftest import FIXTURES, shared_data

EVAL = FIXTURES / "eval"


def reasons(rejects):
    return Counter(r.reason for r in rejects)


def test_commonsenseqa_real_slice():
    items, rejects = load_eval_set(EvalSetConfig(name="commonsenseqa",
                                                 path=str(EVAL / "commonsenseqa_dev_slice.jsonl")))
    assert len(items) == 40 and rejects == []
    first = items[0]
    assert first.id == "1afa02df02c908a558b4036e80242fac"
    assert first.letters == ["A", "B", "C", "D", "E"]
    assert first.choices == ["bank", "library", "department store", "mall", "new york"]
    assert first.gold == "A"
    assert first.options[2] == "C. department store"
    assert sum(gold_distribution(items).values()) == 40


def test_commonsenseqa_malformed_rows_are_reported():
    items, rejects = load_eval_set(EvalSetConfig(name="commonsenseqa",
                                                 path=str(EVAL / "commonsenseqa_malformed.jsonl")))
    # rows 0 and 6 are good; row 7 repeats row 0's id.
    assert [it.id for it in items] == ["1afa02df02c908a558b4036e80242fac",
                                       "a7ab086045575bb497933726e4e6ad28"]
    assert reasons(rejects) == Counter({"malformed_json": 2, "missing_answer": 1,
                                        "bad_answer": 1, "bad_labels": 1,
                                        "missing_stem": 1, "duplicate_id": 1})
    by_reason = {r.reason: r for r in rejects}
    assert by_reason["missing_answer"].row == 2
    assert "test-no-answer" in by_reason["missing_answer"].raw


def test_medqa_real_slice_and_malformed():
    items, rejects = load_eval_set(EvalSetConfig(name="medqa",
                                                 path=str(EVAL / "medqa_test_slice.jsonl")))
    assert len(items) == 30 and rejects == []
    assert items[0].letters == ["A", "B", "C", "D"] and items[0].gold == "B"
    assert items[0].choices[1] == "Tell the attending that he cannot fail to disclose this mistake"

    items, rejects = load_eval_set(EvalSetConfig(name="medqa",
                                                 path=str(EVAL / "medqa_malformed.jsonl")))
    assert len(items) == 2
    assert reasons(rejects) == Counter({"missing_answer": 1, "answer_mismatch": 1,
                                        "malformed_json": 1, "bad_labels": 1,
                                        "empty_choice": 1})


def test_scienceqa_biology_subset_and_variable_choices():
    items, rejects = load_eval_set(EvalSetConfig(name="scienceqa_bio",
                                                 path=str(EVAL / "scienceqa_test.jsonl")))
    # non-biology rows are filtered out (not rejects), like CRAFT's topic == "biology"
    assert [len(it.choices) for it in items] == [2, 4, 5]
    assert [it.gold for it in items] == ["B", "B", "B"]
    assert items[2].letters == ["A", "B", "C", "D", "E"]
    assert reasons(rejects) == Counter({"too_few_choices": 1, "bad_answer": 1,
                                        "malformed_json": 1, "missing_question": 1})


def test_medmcqa_and_csqa2_local_copies():
    items, rejects = load_eval_set(EvalSetConfig(name="medmcqa",
                                                 path=str(EVAL / "medmcqa_validation.jsonl")))
    assert [it.gold for it in items] == ["A", "A", "B", "C"]
    assert reasons(rejects) == Counter({"missing_answer": 1, "bad_answer": 1, "bad_choices": 1})

    items, rejects = load_eval_set(EvalSetConfig(name="csqa2",
                                                 path=str(EVAL / "csqa2_validation.jsonl")))
    assert [(it.choices, it.gold) for it in items] == [(["yes", "no"], "B"),
                                                       (["yes", "no"], "A"),
                                                       (["yes", "no"], "A")]
    assert reasons(rejects) == Counter({"bad_answer": 1, "missing_answer": 1,
                                        "malformed_json": 1, "duplicate_id": 1})


@pytest.mark.parametrize("name,fixture", [("scienceqa_bio", "scienceqa_test.jsonl"),
                                          ("medmcqa", "medmcqa_validation.jsonl"),
                                          ("csqa2", "csqa2_validation.jsonl")])
def test_hub_sets_go_through_datasets_load_dataset(monkeypatch, tmp_path, name, fixture):
    """The hub path calls datasets.load_dataset(hub id, split) and parses its rows; here the
    call is answered by the real JSON builder over a fixture in the hub's columns."""
    import datasets

    good = []
    for line in (EVAL / fixture).read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        keys = {"image", "question", "choices", "answer", "topic", "opa", "opd", "cop"}
        if isinstance(obj, dict) and keys & obj.keys():
            good.append(obj)
    # one row per line with the hub's columns; rows lacking a column get null from the builder
    local = tmp_path / "hub.jsonl"
    local.write_text("".join(json.dumps(o) + "\n" for o in good))
    real = datasets.load_dataset
    calls = []

    def fake(path, split=None, **kw):
        calls.append((path, split))
        return real("json", data_files=str(local), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    items, rejects = load_eval_set(EvalSetConfig(name=name, limit=2))
    assert calls == [HUB_DEFAULTS[name]]
    assert len(items) == 2
    assert all(it.gold in it.letters for it in items)
    assert rejects  # every fixture holds rows the parser must refuse


def test_unreachable_hub_and_missing_file_are_clear_errors(monkeypatch, tmp_path):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EvalSetError, match="set the eval set's `path`"):
        load_eval_set(EvalSetConfig(name="medmcqa"))
    with pytest.raises(EvalSetError, match="does not exist"):
        load_eval_set(EvalSetConfig(name="medqa", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match="read from a local file"):
        EvalSetConfig(name="commonsenseqa")


def test_limit_and_shuffle_are_deterministic():
    cfg = EvalSetConfig(name="commonsenseqa", path=str(EVAL / "commonsenseqa_dev_slice.jsonl"),
                        limit=5, shuffle_seed=7)
    a, _ = load_eval_set(cfg)
    b, _ = load_eval_set(cfg)
    assert [x.id for x in a] == [x.id for x in b] and len(a) == 5
    c, _ = load_eval_set(cfg.model_copy(update={"shuffle_seed": None}))
    assert [x.id for x in c] != [x.id for x in a]


def test_full_shared_files_load_without_rejects():
    for name, rel, n in [("commonsenseqa", "eval/commonsenseqa/dev_rand_split.jsonl", 1221),
                         ("medqa", "eval/medqa/US/4_options/phrases_no_exclude_test.jsonl",
                          1273)]:
        items, rejects = load_eval_set(EvalSetConfig(name=name, path=str(shared_data(rel))))
        assert (len(items), len(rejects)) == (n, 0)


# --- generative sets -------------------------------------------------------------------------


def test_cnn_dailymail_real_schema_and_malformed_rows():
    from craft_ray.evalsets.base import CNN_INSTRUCTION, GenItem
    from craft_ray.tasks.registry import get_task

    cfg = EvalSetConfig(name="cnn_dailymail", path=str(EVAL / "cnn_dailymail_test.jsonl"))
    assert cfg.kind == "generative" and cfg.task == "summarization"
    items, rejects = load_eval_set(cfg)
    assert len(items) == 10 and all(isinstance(it, GenItem) for it in items)
    assert reasons(rejects) == Counter({"malformed_json": 1, "missing_article": 2,
                                        "missing_highlights": 1, "duplicate_id": 1})
    first = json.loads((EVAL / "cnn_dailymail_test.jsonl").read_text().splitlines()[0])
    assert items[0].id == first["id"] and items[0].task == "summarization"
    prompt, reference = get_task("summarization").training_pair(items[0].record)
    # CRAFT's evaluation prompt and reference (run_eval.py, eval_format_official)
    assert prompt == f"{CNN_INSTRUCTION}\n{first['article']}"
    assert reference == first["highlights"]


def _good_cnn(line: str) -> bool:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return all(isinstance(obj.get(k), str) and obj[k].strip() for k in ("article", "highlights"))


def test_cnn_dailymail_craft_subset_is_sklearns_split():
    sklearn = pytest.importorskip("sklearn.model_selection")
    from craft_ray.evalsets.loading import craft_subset_rows

    # CRAFT: train_test_split(range(len(test)), test_size=1000, random_state=1234)[1]
    _, expected = sklearn.train_test_split(range(11490), test_size=1000, random_state=1234)
    assert craft_subset_rows(11490, 1000, 1234) == list(expected)
    items, _ = load_eval_set(EvalSetConfig(name="cnn_dailymail", craft_subset=True,
                                           path=str(EVAL / "cnn_dailymail_test.jsonl")))
    lines = (EVAL / "cnn_dailymail_test.jsonl").read_text().splitlines()
    # the subset is drawn over source rows (bad ones included), then bad rows are rejected
    picked = [lines[i] for i in craft_subset_rows(len(lines), 1000, 1234)]
    assert [it.id for it in items] == list(dict.fromkeys(
        json.loads(ln)["id"] for ln in picked if _good_cnn(ln)))
    assert [it.id for it in items] != list(dict.fromkeys(
        json.loads(ln)["id"] for ln in lines if _good_cnn(ln)))  # the order did change
    with pytest.raises(ValueError, match="craft_subset"):
        EvalSetConfig(name="medmcqa", craft_subset=True)


def test_recipenlg_release_csv_and_hub_columns():
    from craft_ray.tasks.registry import get_task

    cfg = EvalSetConfig(name="recipenlg", path=str(EVAL / "recipenlg_release.csv"))
    assert cfg.task == "recipegen"
    items, rejects = load_eval_set(cfg)
    assert [it.id for it in items] == ["0", "1", "2", "3", "4", "5"]
    assert reasons(rejects) == Counter({"missing_title": 1, "bad_directions": 1,
                                        "empty_ingredients": 1, "duplicate_id": 1})
    rec = items[0].record
    assert rec["instruction"] == ("How can I cook No-Bake Nut Cookies? List the ingredients "
                                  "and the steps.")
    assert rec["ingredients"][0] == "1 c. firmly packed brown sugar" and len(rec["steps"]) == 6
    prompt, reference = get_task("recipegen").training_pair(rec)
    assert prompt == rec["instruction"]
    assert reference.startswith("Ingredients:\n1 c. firmly packed brown sugar\n")
    assert "\nSteps:\nIn a heavy 2-quart saucepan" in reference  # CRAFT's response format

    items, rejects = load_eval_set(EvalSetConfig(
        name="recipenlg", path=str(EVAL / "recipenlg_hub.jsonl"),
        instruction="Write a recipe for {title}."))
    assert [it.id for it in items] == ["100", "101", "102", "300"]
    assert items[1].record["instruction"] == "Write a recipe for Chicken Giblet Gravy."
    # a row in CRAFT's own test form keeps its instruction and steps
    assert items[3].record["instruction"] == "How do I make easy lemon bars for a party?"
    assert reasons(rejects) == Counter({"bad_ingredients": 1})
    with pytest.raises(ValueError, match="title"):
        EvalSetConfig(name="recipenlg", path="x.csv", instruction="no placeholder")
    with pytest.raises(ValueError, match="local file"):
        EvalSetConfig(name="recipenlg")


def test_cnn_dailymail_hub_call(monkeypatch, tmp_path):
    import datasets

    lines = list(dict.fromkeys(ln for ln in (EVAL / "cnn_dailymail_test.jsonl").read_text(
    ).splitlines() if _good_cnn(ln)))
    local = tmp_path / "hub.jsonl"
    local.write_text("\n".join(lines) + "\n")
    real = datasets.load_dataset
    calls = []

    def fake(path, split=None, **kw):
        calls.append((path, split, kw))
        return real("json", data_files=str(local), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    items, rejects = load_eval_set(EvalSetConfig(name="cnn_dailymail"))
    assert calls == [("abisee/cnn_dailymail", "test", {"name": "3.0.0"})]
    assert len(items) == len(lines) == 10 and rejects == []
