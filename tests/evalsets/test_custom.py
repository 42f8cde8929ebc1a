"""`custom` eval sets: your own jsonl/Parquet/CSV file + a field mapping, checked on load,
bad rows rejected with reasons."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from craft_ray.config import ConfigError, validate
from craft_ray.evalsets import LETTERS, EvalSetConfig, EvalSetError, load_eval_set
from craft_ray.evalsets.custom import MAX_OPTIONS
from craft_ray.tasks.registry import get_task

MC = {"kind": "multiple_choice", "question": "q", "options": "opts", "answer": "ans"}


def _cfg(path: Path, fields: dict, **kw) -> EvalSetConfig:
    return validate(EvalSetConfig, {"name": "custom", "path": str(path), "fields": fields, **kw},
                    "<test>")


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_max_options_matches_the_letters():
    assert MAX_OPTIONS == len(LETTERS)


def test_multiple_choice_jsonl_answers_as_letter_index_or_text_and_rejects(tmp_path: Path):
    f = _jsonl(tmp_path / "quiz.jsonl", [
        {"id": "a", "q": "Which gas do plants take in?", "opts": ["O2", "CO2", "N2"], "ans": "B"},
        {"id": "b", "q": "2 + 2?", "opts": ["3", "4"], "ans": 1},
        {"id": "c", "q": "Capital of France?", "opts": {"A": "Rome", "B": "Paris"},
         "ans": "paris"},
        {"id": "d", "q": "", "opts": ["x", "y"], "ans": "A"},             # empty question
        {"id": "e", "q": "One option?", "opts": ["only"], "ans": "A"},    # too few options
        {"id": "f", "q": "Bad answer?", "opts": ["x", "y"], "ans": "Z"},  # no such answer
        {"id": "g", "opts": ["x", "y"], "ans": "A"},                      # no question column
        "{not json",
    ])
    items, rejects = load_eval_set(_cfg(f, {**MC, "id": "id"}))
    assert [(i.id, i.gold, i.choices) for i in items] == [
        ("a", "B", ["O2", "CO2", "N2"]), ("b", "B", ["3", "4"]), ("c", "B", ["Rome", "Paris"])]
    reasons = {r.row: r.reason for r in rejects}
    assert reasons == {3: "missing_question", 4: "bad_options", 5: "bad_answer",
                       6: "missing_question", 7: "malformed_json"}
    assert "the row has ['ans', 'id', 'opts']" in next(r.detail for r in rejects if r.row == 6)
    assert _cfg(f, MC).kind == "multiple_choice" and _cfg(f, MC).task is None


def test_options_as_columns_in_csv_and_parquet(tmp_path: Path):
    rows = [{"question": "Pick the even number", "o1": "3", "o2": "8", "o3": "5", "gold": "1"},
            {"question": "Pick the vowel", "o1": "k", "o2": "e", "o3": "t", "gold": "7"}]
    fields = {"kind": "multiple_choice", "question": "question", "options": ["o1", "o2", "o3"],
              "answer": "gold", "answer_format": "index"}
    with (tmp_path / "q.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    for name in ("q.csv", "q.parquet"):
        items, rejects = load_eval_set(_cfg(tmp_path / name, fields))
        assert [(i.question, i.gold) for i in items] == [("Pick the even number", "B")]
        assert [(r.reason, "outside 0..2" in r.detail) for r in rejects] == [("bad_answer",
                                                                               True)]


def test_generative_custom_set_builds_the_task_record(tmp_path: Path):
    f = _jsonl(tmp_path / "news.jsonl", [
        {"article": "The council voted on Monday to build a new bridge. " * 5,
         "highlights": "Council approves bridge."},
        {"article": "Text without a reference."},
    ])
    fields = {"kind": "generative", "task": "summarization",
              "record": {"long_but_clean_text": "article", "summary": "highlights"},
              "values": {"instruction": "Please summarize the text below:"}}
    cfg = _cfg(f, fields, label="news")
    assert cfg.kind == "generative" and cfg.task == "summarization"
    items, rejects = load_eval_set(cfg)
    assert len(items) == 1 and [r.reason for r in rejects] == ["missing_summary"]
    prompt, reference = get_task("summarization").training_pair(items[0].record)
    assert prompt.startswith("Please summarize the text below:") and "bridge" in prompt
    assert reference == "Council approves bridge."


def test_mapping_errors_are_clear_at_config_load(tmp_path: Path):
    f = tmp_path / "x.jsonl"
    with pytest.raises(ConfigError, match="needs `fields`"):
        validate(EvalSetConfig, {"name": "custom", "path": str(f)}, "<t>")
    with pytest.raises(ConfigError, match="needs `fields`"):
        validate(EvalSetConfig, {"name": "medqa", "path": str(f), "fields": MC}, "<t>")
    with pytest.raises(ConfigError, match=r"needs \['answer'\]"):
        _cfg(f, {k: v for k, v in MC.items() if k != "answer"})
    with pytest.raises(ConfigError, match="not mapped"):
        _cfg(f, {"kind": "generative", "task": "summarization",
                 "record": {"long_but_clean_text": "article"}})
    with pytest.raises(ConfigError, match=r"unknown \['title'\]"):
        _cfg(f, {"kind": "generative", "task": "summarization",
                 "record": {"long_but_clean_text": "a", "summary": "b", "title": "c"},
                 "values": {"instruction": "Summarize:"}})
    with pytest.raises(ConfigError, match="path"):
        validate(EvalSetConfig, {"name": "custom", "fields": MC}, "<t>")
    with pytest.raises(EvalSetError, match="does not exist"):
        load_eval_set(_cfg(f, MC))
    _jsonl(f, [{"q": "?", "opts": ["a"], "ans": "A"}])
    with pytest.raises(EvalSetError, match="no usable items.*bad_options"):
        load_eval_set(_cfg(f, MC))
