"""Filter stage: leakage, decontamination, judge parsing, nested sized datasets, exports."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from craft_ray.stages.filter.config import DecontamSetConfig, FilterError, FilterStageConfig
from craft_ray.stages.filter.decontam import (
    NgramIndex,
    leakage_scores,
    load_decontam_set,
    overlap_summary,
)
from craft_ray.stages.filter.dedup import normalize_text
from craft_ray.stages.filter.output import select_nested
from craft_ray.stages.filter.quality import judge_reason, parse_judge_scores, quality_judge_prompt
from craft_ray.stages.filter.stage import check_input_columns, run_filter
from craft_ray.tasks.fewshots import FewShotConfig, load_fewshots
from craft_ray.tasks.registry import get_task
from tests.conftest import FIXTURES, shared_data

FEWSHOTS = FIXTURES / "filter" / "fewshots_medqa.jsonl"
EVAL = FIXTURES / "filter" / "eval_medqa.jsonl"
# Real, mutually distinct StackExchange questions (cosine < 0.85, word Jaccard < 0.35).
QUESTIONS = (FIXTURES / "filter" / "questions.txt").read_text().splitlines()
WORDS = sorted({w.strip("?.,!").lower() for q in QUESTIONS for w in q.split() if len(w) > 3})


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _row(sid: str, question: str, options: list[str], answer: str = "A") -> dict:
    task = get_task("medqa")
    rec = {"question": question, "options": options, "answer": answer}
    return {**rec, "sample_id": sid, "task": "medqa", "doc_id": f"pubmed/0.jsonl#{sid}",
            "corpus": "pubmed" if sid.endswith(("0", "2", "4", "6", "8")) else "wiki",
            "fewshot_ids": ["fewshots_medqa:0"], "prompt_hash": "h",
            "sample_text": task.sample_text(rec)}


def make_clean_rows(n_base: int = 120) -> tuple[list[dict], dict[str, set[str]]]:
    """Distinct random-word QA samples plus planted cases; returns rows and planted ids."""
    rng = random.Random(0)
    rows = []
    for i in range(n_base):
        rows.append(_row(f"g{i:04d}", QUESTIONS[i],
                         [f"{L}. {_words(rng, 2)}" for L in "ABCD"], rng.choice("ABCD")))
    planted: dict[str, set[str]] = {k: set() for k in ("exact", "near", "leak", "contam")}
    for j in range(5):  # same text up to case and punctuation
        src = rows[j]
        rows.append(_row(f"x{j:04d}", src["question"].upper() + "!!", src["options"],
                         src["answer"]))
        planted["exact"].add(f"x{j:04d}")
    for j in range(5):  # one word replaced
        src = rows[10 + j]
        words = src["question"].split()
        words[3] = "replaced"
        rows.append(_row(f"y{j:04d}", " ".join(words), src["options"], src["answer"]))
        planted["near"].add(f"y{j:04d}")
    shots = load_fewshots(FewShotConfig(path=str(FEWSHOTS)))
    task = get_task("medqa")
    for j, shot in enumerate(shots[:3]):  # a few-shot with a word changed
        rec = task.fewshot_record(shot)
        rows.append(_row(f"z{j:04d}", rec["question"].replace("the", "a", 1), rec["options"],
                         rec["answer"]))
        planted["leak"].add(f"z{j:04d}")
    evals = [json.loads(x) for x in EVAL.read_text().splitlines()[:3]]
    for j, ev in enumerate(evals):  # an eval question copied verbatim
        rows.append(_row(f"c{j:04d}", ev["question"],
                         [f"{L}. {_words(rng, 2)}" for L in "ABCD"]))
        planted["contam"].add(f"c{j:04d}")
    return rows, planted


def _stage_cfg(tmp_path: Path, **filter_over) -> FilterStageConfig:
    run_dir = tmp_path / "run"
    (run_dir / "generate").mkdir(parents=True, exist_ok=True)
    (run_dir / "retrieve").mkdir(parents=True, exist_ok=True)
    (run_dir / "retrieve" / "config.yaml").write_text(
        "retrieve:\n  top_k: 7\n  mix: [pubmed, wiki]\n")
    cfg = {
        "task": "medqa",
        "fewshots": {"path": str(FEWSHOTS)},
        "decontamination": {"eval_sets": [{"name": "medqa_test", "path": str(EVAL),
                                           "text_fields": ["question", "options"]}]},
        "dedup": {"semantic": {"num_clusters": 1}},
        "datasets": {"sizes": {"S": 40, "M": 80, "L": 10_000}, "seed": 3},
        **filter_over,
    }
    return FilterStageConfig.model_validate({"run_dir": str(run_dir), "filter": cfg})


# --- plain functions ----------------------------------------------------------------------


def test_leakage_scores_flag_near_copies_of_fewshots():
    task = get_task("medqa")
    shots = load_fewshots(FewShotConfig(path=str(FEWSHOTS)))
    fs = [task.sample_text(task.fewshot_record(s)) for s in shots]
    near = fs[1].replace("Which", "which").replace("the", "a", 2)
    other = "What colour is the sky on a clear day?\nA. Blue\nB. Red\nC. Green\nD. Black\n" \
            "Answer: A"
    score, best = leakage_scores([near, other], fs)
    assert score[0] >= 85 and best[0] == 1
    assert score[1] < 85


def test_decontamination_ngrams_on_the_real_eval_sets():
    csqa = load_decontam_set(DecontamSetConfig(
        name="csqa", path=str(shared_data("eval/commonsenseqa/dev_rand_split.jsonl")),
        text_fields=["question.stem", "question.choices.text"]))
    medqa = load_decontam_set(DecontamSetConfig(
        name="medqa",
        path=str(shared_data("eval/medqa/US/4_options/phrases_no_exclude_test.jsonl")),
        text_fields=["question", "options"]))
    assert len(csqa) == 1221 and len(medqa) == 1273
    assert "revolving door" in csqa[0] and "new york" in csqa[0]
    assert "Disclose the error to the patient" in medqa[0]
    copied = "Background. " + " ".join(medqa[7].split()[:20]) + " and more."
    clean = "How long should green coffee beans rest after roasting before brewing them " \
            "in a French press at home for the best flavour overall?"
    idx13 = NgramIndex(medqa, 13)
    hits = idx13.hits([copied, clean], max_items=50)
    assert 7 in hits[0] and hits[1] == []
    summary = overlap_summary(hits, len(medqa))
    assert summary["samples_overlapping"] == 1 and summary["samples_overlapping_pct"] == 50.0
    # 5-grams are looser: a CSQA stem's 5-gram inside a sample counts.
    stem5 = " ".join(csqa[0].split()[:6])
    assert NgramIndex(csqa, 5).hits([f"Q: {stem5} here"], 5)[0][0] == 0


def test_eval_set_without_text_fields_is_a_clear_error(tmp_path):
    with pytest.raises(FilterError, match="no text at fields"):
        load_decontam_set(DecontamSetConfig(name="m", path=str(EVAL), text_fields=["nope"]))
    with pytest.raises(FilterError, match="does not exist"):
        load_decontam_set(DecontamSetConfig(name="m", path=str(tmp_path / "x.jsonl"),
                                    text_fields=["q"]))


def test_input_without_contract_columns_is_rejected_before_work(tmp_path):
    p = tmp_path / "clean.parquet"
    pq.write_table(pa.table({"sample_id": ["a"], "question": ["q"]}), p)
    with pytest.raises(FilterError, match=r"lacks column\(s\) \['sample_text', 'options', "
                       r"'answer'\]"):
        check_input_columns(p, ["question", "options", "answer"])


def test_judge_prompt_and_score_parsing():
    p = quality_judge_prompt("medqa", "Q?\nA. x\nAnswer: A", "doc " * 5000, True, max_doc_chars=100)
    assert "correctness" in p and "[...]" in p and len(p) < 2000
    assert "correctness" not in quality_judge_prompt("summarization", "s", "d", False)
    crit = ("relevance", "coverage", "correctness")
    assert parse_judge_scores('Sure: {"relevance": 9, "coverage": 7, "correctness": 4}',
                              crit) == {"relevance": 9, "coverage": 7, "correctness": 4}
    assert parse_judge_scores("Relevance: 8\nCoverage - 6\nCorrectness: 10", crit) == \
        {"relevance": 8, "coverage": 6, "correctness": 10}
    assert parse_judge_scores('{"relevance": 9, "coverage": 7}', crit) is None
    assert parse_judge_scores('{"relevance": 11, "coverage": 7, "correctness": 5}', crit) is None
    mins = {"relevance": 6, "coverage": 6, "correctness": 6}
    assert judge_reason({"relevance": 9, "coverage": 6, "correctness": 6}, mins) == (None, None)
    assert judge_reason({"relevance": 9, "coverage": 5, "correctness": 2}, mins) == \
        ("judge_low_score", "coverage=5<6, correctness=2<6")
    assert judge_reason(None, mins)[0] == "judge_unparseable"


def test_judge_defaults_to_the_generate_stage_backend(tmp_path):
    from craft_ray.stages.filter.config import QualityJudgeConfig
    from craft_ray.stages.filter.quality import resolve_judge

    run = tmp_path / "run"
    (run / "generate").mkdir(parents=True)
    docs = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc_id": ["d"], "text": ["t"]}), docs)
    # StageDir writes the stage's own section (GenerateConfig fields at the top level).
    (run / "generate" / "config.yaml").write_text(
        f"task: medqa\nbackend: hf\nmodel: some/model\ninput_path: {docs}\n"
        "hf: {batch_size: 3, concurrency: 2}\n")
    r = resolve_judge(QualityJudgeConfig(enabled=True), run)
    assert (r["backend"], r["model"], r["tokenizer"], r["docs"]) == \
        ("hf", "some/model", "some/model", str(docs))
    assert r["settings"].batch_size == 3 and r["settings"].concurrency == 2
    with pytest.raises(FilterError, match="no backend/model"):
        resolve_judge(QualityJudgeConfig(enabled=True), tmp_path / "empty")


def test_select_nested_names_sizes_that_cannot_be_built():
    table = pa.table({"x": list(range(50))})
    take, skipped = select_nested(table, {"S": 20, "M": 54, "L": 100}, 4)
    assert take == {"S": 16, "M": 50}
    assert skipped == {"L": {"size": 100, "needed_generated": 96, "available": 50}}


def test_sizes_smaller_than_the_fewshots_are_a_config_error(tmp_path):
    cfg = _stage_cfg(tmp_path, datasets={"sizes": {"S": 3}})
    pq.write_table(pa.Table.from_pylist(make_clean_rows(20)[0]),
                   Path(cfg.run_dir) / "generate" / "clean.parquet")
    with pytest.raises(FilterError, match="smaller than the 4 few-shots"):
        run_filter(cfg)


# --- the stage on Ray -----------------------------------------------------------------------


def test_filter_stage_end_to_end(tmp_path, ray_local, caplog):
    import datasets

    rows, planted = make_clean_rows()
    cfg = _stage_cfg(tmp_path)
    run_dir = Path(cfg.run_dir)
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "generate" / "clean.parquet")
    caplog.set_level("WARNING")
    stats = run_filter(cfg)
    out = run_dir / "filter"

    # Each step dropped exactly its planted rows, with the reason, in its own rejects.
    steps = {s["step"]: s for s in stats["steps"]}
    assert list(steps) == ["exact_dedup", "fewshot_leakage", "decontamination", "fuzzy_dedup",
                           "semantic_dedup"]
    expect = {"exact_dedup": ("exact", "exact_duplicate"),
              "fewshot_leakage": ("leak", "fewshot_leakage"),
              "decontamination": ("contam", "eval_contamination"),
              "fuzzy_dedup": ("near", "near_duplicate")}
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert len(rejects) == sum(len(v) for v in planted.values())
    for step, (kind, reason) in expect.items():
        mine = [r for r in rejects if r["reject_step"] == step]
        assert {r["sample_id"] for r in mine} == planted[kind], step
        assert {r["reject_reason"] for r in mine} == {reason}
        assert all(r["reject_detail"] for r in mine)
        assert steps[step]["dropped"] == len(planted[kind])
    assert steps["semantic_dedup"]["dropped"] == 0
    assert stats["rows_in"] == len(rows) and stats["rows_out"] == 120
    assert stats["rejects"] == {"exact_duplicate": 5, "fewshot_leakage": 3,
                                "eval_contamination": 3, "near_duplicate": 5}

    # Decontamination report: the 3 planted copies at 13-grams (before the drop), none after.
    rep = json.loads((out / "decontamination.json").read_text())
    med = rep["eval_sets"]["medqa_test"]
    assert med["13"]["samples_overlapping"] == 3 and med["items"] == 20
    assert med["13"]["eval_items_overlapping"] >= 3  # stock MedQA phrasing can add more
    assert "5" in med and med["5"]["samples_overlapping"] >= 3
    assert rep["datasets"]["S"]["medqa_test"]["13"]["samples_overlapping"] == 0

    # Sizes: S and M built and nested, L too big (message names what was built).
    assert set(stats["datasets"]) == {"S", "M"}
    assert stats["sizes_skipped"]["L"]["available"] == 120
    assert any("size(s) L" in r.message and "built: S, M" in r.message for r in caplog.records)
    assert not (out / "datasets" / "L").exists()
    s = datasets.load_from_disk(str(out / "datasets" / "S" / "hf"))
    m = datasets.load_from_disk(str(out / "datasets" / "M" / "hf"))
    assert len(s) == 40 and len(m) == 80
    assert set(s["sample_id"]) < set(m["sample_id"])
    assert sum(s["is_few_shot"]) == sum(m["is_few_shot"]) == 4
    assert s.column_names[:4] == ["question", "options", "answer", "is_few_shot"]
    assert {"sample_id", "doc_id", "corpus"} <= set(s.column_names)
    assert isinstance(s[0]["options"], list)
    norm = [normalize_text(get_task("medqa").sample_text(r)) for r in m]
    assert len(set(norm)) == len(norm)  # never two identical samples
    planted_ids = set().union(*planted.values())
    assert not planted_ids & set(m["sample_id"])
    # Parquet and JSONL hold the same rows; the card states provenance.
    assert pq.read_table(out / "datasets" / "M" / "data.parquet").column("sample_id") \
        .to_pylist() == m["sample_id"]
    jl = [json.loads(x) for x in (out / "datasets" / "M" / "data.jsonl").read_text()
          .splitlines()]
    assert [r["sample_id"] for r in jl] == m["sample_id"]
    card = (out / "datasets" / "M" / "README.md").read_text()
    assert "top_k: 7" in card and "| pubmed |" in card and "| fuzzy_dedup | 120 |" not in card
    assert "| exact_dedup | 136 | 131 | 5 |" in card
    assert (out / "_SUCCESS").is_file()

    # A rerun with the same config is skipped (same stats back, nothing rewritten).
    mtime = (out / "datasets" / "S" / "data.parquet").stat().st_mtime
    assert run_filter(cfg)["rows_out"] == 120
    assert (out / "datasets" / "S" / "data.parquet").stat().st_mtime == mtime


def test_judge_parse_batch_sets_scores_and_reasons():
    from craft_ray.stages.filter.quality import judge_parse_batch

    t = pa.table({
        "sample_id": ["a", "b", "c", "d", "e"],
        "prompt": ["p"] * 5, "prompt_token_ids": [[1]] * 5, "messages": ["[]"] * 5,
        "schema": ["{}"] * 5, "max_new_tokens": [8] * 5,
        "_judge_doc_missing": [False, False, False, True, False],
        "text": ['{"relevance": 9, "coverage": 8, "correctness": 7}',
                 '{"relevance": 9, "coverage": 3, "correctness": 7}', "no scores here",
                 '{"relevance": 9, "coverage": 9, "correctness": 9}', ""],
        "tokens_in": [1] * 5, "tokens_out": [1] * 5, "gen_seconds": [0.1] * 5,
        "finish_reason": ["stop"] * 5, "error": ["", "", "", "", "Server error"],
        "error_detail": [""] * 5,
    })
    out = judge_parse_batch(t, ["relevance", "coverage", "correctness"],
                            {"relevance": 6, "coverage": 6, "correctness": 6})
    assert "text" not in out.column_names and "prompt" not in out.column_names
    assert out.column("judge_coverage").to_pylist() == [8, 3, None, 9, None]
    assert out.column("reject_reason").to_pylist() == [
        None, "judge_low_score", "judge_unparseable", "judge_missing_document",
        "judge_backend_error"]
    assert out.column("reject_step").to_pylist()[1] == "judge"


def test_judge_through_the_hf_backend(tmp_path, ray_local, tiny_causal_lm):
    """The judge wired end to end through the hf backend (tiny random model, guided JSON
    compiled without free whitespace): every reply parses to 1-10 scores, a sample whose
    document is missing is rejected with that reason, and every outcome is accounted for."""
    rows = make_clean_rows(12)[0][:12]
    cfg = _stage_cfg(tmp_path, decontamination={"enabled": False},
                     dedup={"exact": {"enabled": False}, "fuzzy": {"enabled": False},
                            "semantic": {"enabled": False}},
                     datasets={"sizes": {"S": 6}},
                     judge={"enabled": True, "backend": "hf", "model": str(tiny_causal_lm),
                            "hf": {"batch_size": 6},
                            "min_scores": {"relevance": 4, "coverage": 2, "correctness": 1}})
    run_dir = Path(cfg.run_dir)
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "generate" / "clean.parquet")
    docs = [{"doc_id": r["doc_id"], "text": f"Source text about {r['question']}"}
            for r in rows[1:]]  # the first sample's document is missing
    pq.write_table(pa.Table.from_pylist(docs), run_dir / "retrieve" / "corpus_samples.parquet")
    stats = run_filter(cfg)
    judge = stats["steps"][-1]
    assert judge["step"] == "judge" and judge["rows_in"] == 12
    out = run_dir / "filter"
    survivors = pq.read_table(out / "survivors").to_pylist() \
        if (out / "survivors").exists() else []
    rejects = pq.read_table(out / "judge_rejects").to_pylist()
    assert len(survivors) + len(rejects) == 12 and judge["dropped"] == len(rejects)
    by_id = {r["sample_id"]: r for r in rejects}
    assert by_id[rows[0]["sample_id"]]["reject_reason"] == "judge_missing_document"
    # no reply was cut off or malformed: compact JSON closes well within max_new_tokens
    assert set(judge["reasons"]) <= {"judge_missing_document", "judge_low_score"}
    crit = ("relevance", "coverage", "correctness")
    for r in survivors + [r for r in rejects if r["reject_reason"] == "judge_low_score"]:
        assert all(1 <= r[f"judge_{c}"] <= 10 for c in crit), r
    for r in survivors:  # whatever passed met every minimum
        assert r["judge_relevance"] >= 4 and r["judge_coverage"] >= 2
    for r in rejects:
        if r["reject_reason"] == "judge_low_score":
            assert r["judge_relevance"] < 4 or r["judge_coverage"] < 2


def test_no_clean_samples_give_empty_outputs_and_a_too_few_message(tmp_path, ray_local, caplog):
    """Generation can yield 0 clean samples (a weak generator): the filter then writes empty
    outputs and says which sizes it could not build, instead of crashing in a dedup shuffle."""
    cfg = _stage_cfg(tmp_path)
    run_dir = Path(cfg.run_dir)
    schema = pa.Table.from_pylist([_row("g0000", QUESTIONS[0], ["A. a", "B. b", "C. c",
                                                                "D. d"])]).schema
    pq.write_table(schema.empty_table(), run_dir / "generate" / "clean.parquet")
    caplog.set_level("WARNING")
    stats = run_filter(cfg)
    assert stats["rows_in"] == 0 == stats["rows_out"] and stats["steps"] == []
    assert stats["datasets"] == {} and set(stats["sizes_skipped"]) == {"S", "M", "L"}
    assert stats["sizes_skipped"]["S"]["available"] == 0
    messages = [r.message for r in caplog.records]
    assert any("holds no clean samples" in m for m in messages)
    assert any("too few surviving samples for size(s) S" in m and "built: none" in m
               for m in messages)
    assert (run_dir / "filter" / "_SUCCESS").is_file()
