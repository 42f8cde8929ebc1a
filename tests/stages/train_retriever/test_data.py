"""Training data of train-retriever: LLM-Embedder jsonl, BEIR folders, CRAFT retrieve output,
and the errors bad data gives (no Ray)."""

from __future__ import annotations

import json

import pytest

from craft_ray.stages.train_retriever.config import TrainRetrieverConfig
from craft_ray.stages.train_retriever.data import (
    RetrieverDataError,
    beir_examples,
    check_rejects,
    craft_examples,
    load_corpus_file,
    load_jsonl_examples,
    load_relevance,
)
from craft_ray.tasks.fewshots import FewShot


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_llm_embedder_jsonl_loads_texts_indices_scores_and_answers(tmp_path):
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [
        {"_id": "d0", "title": "Grind", "text": "fine for espresso"},
        {"_id": "d1", "text": "coarse for french press"},
        {"_id": "d2", "text": "store beans airtight"}])
    data = _write_jsonl(tmp_path / "train.jsonl", [
        {"query": "espresso grind?", "pos": ["fine for espresso"], "neg": ["store beans"],
         "teacher_scores": [-0.5, -3], "answers": "fine"},
        {"query": "press grind?", "pos_index": [1], "neg_index": [0, 2],
         "answers": ["coarse"]},
    ])
    texts = load_corpus_file(corpus)
    assert texts == ["Grind fine for espresso", "coarse for french press",
                     "store beans airtight"]
    exs, rejects = load_jsonl_examples(data, texts)
    assert rejects == []
    a, b = exs
    assert (a.query, a.pos, a.neg, a.teacher_scores, a.answers) == (
        "espresso grind?", ["fine for espresso"], ["store beans"], [-0.5, -3.0], ["fine"])
    assert b.pos == ["coarse for french press"]
    assert b.neg == ["Grind fine for espresso", "store beans airtight"]
    assert b.teacher_scores is None and b.answers == ["coarse"]


def test_bad_rows_are_rejected_with_reasons_and_the_error_names_file_and_format(tmp_path):
    data = _write_jsonl(tmp_path / "bad.jsonl", [
        {"query": "ok", "pos": ["p"]},
        "{not json",
        {"query": "", "pos": ["p"]},
        {"query": "q", "pos": "p", "teacher_scores": [1.0, 2.0]},
        {"query": "q", "pos_index": [3]},
    ])
    exs, rejects = load_jsonl_examples(data)
    assert len(exs) == 1
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert set(reasons) == {2, 3, 4, 5}
    assert reasons[2].startswith("not valid JSON")
    assert "query" in reasons[3]
    assert "teacher_scores" in reasons[4] and "1 pos + 0 neg" in reasons[4]
    assert "corpus" in reasons[5]  # pos_index without a corpus to resolve it
    with pytest.raises(RetrieverDataError) as err:
        check_rejects(str(data), len(exs), rejects, max_fraction=0.0)
    msg = str(err.value)
    assert str(data) in msg and "4 of 5 rows" in msg and "line 2" in msg
    assert "{query: str, pos: [str]" in msg  # what was expected
    check_rejects(str(data), len(exs), rejects, max_fraction=0.8)  # tolerated: no raise
    with pytest.raises(RetrieverDataError, match="does not exist"):
        load_jsonl_examples(tmp_path / "missing.jsonl")
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(RetrieverDataError, match="holds no rows"):
        check_rejects(str(empty), 0, [], max_fraction=0.5)
    with pytest.raises(RetrieverDataError, match=r"corpus .*:2: expected an object with a "
                       "string 'text'"):
        load_corpus_file(_write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"body": "b"}]))


def test_beir_examples_use_qrels_positives_and_judged_negatives(tmp_path):
    (tmp_path / "qrels").mkdir()
    _write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "text": f"doc {i}"}
                                             for i in range(4)])
    _write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "first"},
                                              {"_id": "q2", "text": "second"}])
    (tmp_path / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td0\t1\nq1\td3\t0\nq2\td2\t2\n")
    a, b = beir_examples(tmp_path, "train")
    assert (a.query, a.pos, a.neg, a.query_id) == ("first", ["doc 0"], ["doc 3"], "q1")
    assert (b.pos, b.neg) == (["doc 2"], [])
    mined = beir_examples(tmp_path, "train", {"q2": ["doc 1"]})
    assert mined[0].neg == [] and mined[1].neg == ["doc 1"]
    with pytest.raises(RetrieverDataError, match=r"qrels/test.tsv does not exist"):
        beir_examples(tmp_path, "test")


def test_craft_pairs_from_retrieve_output_with_and_without_judge_scores(tmp_path):
    shots = [FewShot(f"fs:{i}", f"text {i}", f"instr {i}", f"out {i}",
                     {"Text": f"text {i}", "Instruction": f"instr {i}", "Output": f"out {i}"})
             for i in range(3)]
    samples = [  # as the retrieve stage writes corpus_samples (fewshot_ids / fewshot_ranks)
        {"doc_id": "c/0/1", "text": "doc A", "fewshot_ids": ["fs:0", "fs:1"],
         "fewshot_ranks": [2, 0], "score": 0.9},
        {"doc_id": "c/0/2", "text": "doc B", "fewshot_ids": ["fs:0"], "fewshot_ranks": [0],
         "score": 0.8},
        {"doc_id": "c/0/3", "text": "doc C", "fewshot_ids": ["fs:0"], "fewshot_ranks": [1],
         "score": 0.7},
    ]
    exs = craft_examples(samples, shots, "{Instruction} | {Text}", positives_per_shot=2)
    assert [e.query_id for e in exs] == ["fs:0", "fs:1"]  # fs:2 retrieved nothing
    assert exs[0].query == "instr 0 | text 0"
    assert exs[0].pos == ["doc B", "doc C"] and exs[0].neg == []  # its top-2 by rank
    assert exs[1].pos == ["doc A"]
    rel_file = _write_jsonl(tmp_path / "rel.jsonl", [
        {"fewshot_id": "fs:0", "doc_id": "c/0/1", "relevance": 0.9},
        {"fewshot_id": "fs:0", "doc_id": "c/0/2", "relevance": 0.1},
        {"fewshot_id": "fs:1", "doc_id": "c/0/1", "relevance": 0.2}])
    judged = craft_examples(samples, shots, "{Text}", 2, load_relevance(rel_file), 0.5)
    assert [(e.query_id, e.pos, e.neg) for e in judged] == [("fs:0", ["doc A"], ["doc B"])]
    with pytest.raises(RetrieverDataError, match="no few-shot has a positive"):
        craft_examples(samples, shots, "{Text}", 2, {}, 0.5)
    with pytest.raises(RetrieverDataError, match="corpus_samples"):
        craft_examples([{"doc_id": "x", "text": "t"}], shots, "{Text}", 2)
    with pytest.raises(RetrieverDataError, match="numeric relevance"):
        load_relevance(_write_jsonl(tmp_path / "r2.jsonl", [{"fewshot_id": "a"}]))


def test_config_checks_and_defaults(tmp_path):
    with pytest.raises(ValueError, match="give training data"):
        TrainRetrieverConfig(out=str(tmp_path / "m"))
    with pytest.raises(ValueError, match="not a multiple of num_workers"):
        TrainRetrieverConfig(data="x.jsonl", out="m", batch_size=5, num_workers=2)
    with pytest.raises(ValueError, match="fp16 needs use_gpu"):
        TrainRetrieverConfig(data="x.jsonl", out="m", precision="fp16")
    with pytest.raises(ValueError, match="extra"):
        TrainRetrieverConfig(data="x.jsonl", out="m", loss={"temprature": 0.1})
    # data and model in object storage: the work folder is local scratch, and Ray Train's
    # storage goes beside OUT in the bucket
    with pytest.raises(ValueError, match=r"not object storage: work_dir=s3://b/w\. .* data, "
                       r"out and storage_path may be"):
        TrainRetrieverConfig(data="x.jsonl", out="m", work_dir="s3://b/w")
    remote = TrainRetrieverConfig(data="s3://b/d.jsonl", out="gs://b/m/", storage_path=None)
    assert remote.storage_root() == "gs://b/m.work/ray"
    assert "://" not in str(remote.work_path()) and remote.work_path().name.startswith("m-")
    assert TrainRetrieverConfig(data="x.jsonl", out="m", storage_path="s3://b/ray"
                                ).storage_root() == "s3://b/ray"
    beir = TrainRetrieverConfig(data=str(tmp_path), out=str(tmp_path / "m"))
    assert beir.data_format() == "beir" and beir.negatives_source() == "mine"
    assert beir.eval_folder() == str(tmp_path)
    assert beir.work_path() == tmp_path / "m.work"
    js = TrainRetrieverConfig(data=str(tmp_path / "t.jsonl"), out="m")
    assert js.data_format() == "jsonl" and js.negatives_source() == "given"
    assert js.eval_folder() is None
    # logging knobs do not change the run's name (a rerun resumes); the lr does
    assert js.resume_key() == js.model_copy(update={"stop_after_steps": 3}).resume_key()
    assert js.resume_key() != js.model_copy(update={"learning_rate": 1e-3}).resume_key()


def test_craft_section_builds_training_pairs_from_a_retrieve_output(tmp_path):
    """The config path of the CRAFT loop: a `craft` section (retrieve stage output + the
    few-shots) is all the data a run needs; prepare_examples turns it into pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from craft_ray.config import load_config
    from craft_ray.stages.train_retriever.stage import prepare_examples

    shots = _write_jsonl(tmp_path / "shots.jsonl", [
        {"Text": "Espresso needs a fine grind.", "Instruction": "How fine?", "Output": "Fine"},
        {"Text": "Keep beans airtight.", "Instruction": "How to store?", "Output": "Airtight"}])
    pq.write_table(pa.Table.from_pylist([
        {"doc_id": "se/0#1", "text": "Grind espresso like powdered sugar.", "score": 0.8,
         "fewshot_ids": ["shots:0"], "fewshot_ranks": [0]},
        {"doc_id": "se/0#2", "text": "Store beans in an opaque jar.", "score": 0.7,
         "fewshot_ids": ["shots:1", "shots:0"], "fewshot_ranks": [0, 1]}]),
        tmp_path / "corpus_samples.parquet")
    cfg_file = tmp_path / "tr.yaml"
    cfg_file.write_text(
        f"out: {tmp_path / 'm'}\ncraft:\n  corpus_samples: {tmp_path / 'corpus_samples.parquet'}"
        f"\n  positives_per_shot: 1\n  fewshots:\n    path: {shots}\n")
    cfg = load_config(TrainRetrieverConfig, cfg_file).resolved()
    assert cfg.data is None and cfg.eval_folder() is None
    exs, rejects = prepare_examples(cfg, tmp_path / "work")
    assert rejects == []
    assert [(e.query_id, e.pos) for e in exs] == [
        ("shots:0", ["Grind espresso like powdered sugar."]),
        ("shots:1", ["Store beans in an opaque jar."])]
    assert exs[0].query.startswith("Text: Espresso needs a fine grind.")


def test_cli_refuses_an_s3_work_dir_before_ray_starts(tmp_path, monkeypatch):
    """`--out s3://...` reaches the config whole (not turned into a local `s3:/` folder); a
    work_dir in object storage is refused before Ray starts."""
    from typer.testing import CliRunner

    import craft_ray.runtime
    from craft_ray.cli import app

    started: list[object] = []
    monkeypatch.setattr(craft_ray.runtime, "init_ray", lambda *a, **k: started.append(a))
    monkeypatch.chdir(tmp_path)
    data = _write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "pos": ["p"]}])
    res = CliRunner().invoke(app, ["train-retriever", "--data", str(data),
                                   "--out", "s3://bucket/retriever",
                                   "--set", "work_dir=s3://bucket/work"])
    assert res.exit_code == 2, res.output
    assert "work_dir=s3://bucket/work" in res.output and started == []
    assert list(tmp_path.iterdir()) == [data]  # no local `s3:` folder
