"""The filter stage on real generation outputs of each of the five built-in tasks.

One module-wide setup: a slice of the bundled coffee StackExchange dump is read with the real
reader and embedded with the offline MiniLM into a store, one retrieval stage with CRAFT's
MedQA few-shots (``run_retrieve``) picks the documents, and the tiny random-init generator
writes each task's generation outputs from those documents with the generate stage's own
functions (prompt builder, hf backend with guided JSON, parser, raw/clean/rejects split) run in
this process: one model load for all five tasks instead of two Ray actor pools per task.
``craft-ray generate`` itself is covered by tests/test_generate.py. Then ``run_filter`` runs on
each task's ``clean.parquet``; a last test runs the LLM judge (the same tiny model, hf backend
on Ray) on medqa's generated samples.

The tiny generator is untrained, so the samples are schema-valid noise: these tests check that
every filter step, the sized datasets and the reports work on each task's real columns, not
the quality of the samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from craft_ray.tasks.registry import get_task
from tests.conftest import ROOT

TASKS = ["bioqa", "csqa", "medqa", "recipegen", "summarization"]
FEWSHOTS = ROOT / "data" / "fewshots"
EVAL_MEDQA = ROOT / "data" / "eval" / "medqa_usmle_4opt_test_first60.jsonl"
COFFEE = ROOT / "data" / "stackexchange" / "coffee.stackexchange.com" / "Posts.xml"
N_SHOTS = 4  # few-shots per task (generate prompts, leakage filter, datasets)
N_DOCS = 8  # retrieved documents, one generation each per task

# Generation per task. Summarization's CRAFT few-shots carry the whole source text in their
# answer (up to 33k characters), which never fits the tiny model's 4k context next to a
# document, so its prompts hold no few-shot; its schema's minimum lengths (100 / 500
# characters) need a string cap above them and more tokens.
GEN = {
    "bioqa": {"num_shots": 1, "max_new_tokens": 160},
    "csqa": {"num_shots": 1, "max_new_tokens": 160},
    "medqa": {"num_shots": 1, "max_new_tokens": 160},
    "recipegen": {"num_shots": 1, "max_new_tokens": 400, "max_prompt_tokens": 3000},
    "summarization": {"num_shots": 0, "max_new_tokens": 1000, "max_prompt_tokens": 3000,
                      "cap": 600},
}


def _posts_slice(src: Path, dst: Path, rows: int) -> Path:
    """The XML header and the first ``rows`` posts of a StackExchange dump."""
    out, n = [], 0
    with src.open(encoding="utf-8-sig") as fh:
        for line in fh:
            if line.lstrip().startswith("<row"):
                n += 1
                if n > rows:
                    break
            out.append(line)
    out.append("</posts>\n")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(out), encoding="utf-8")
    return dst


def _store(base: Path, posts: Path) -> Path:
    """An embedding store of the posts (real reader, offline MiniLM), as the embed stage
    writes it."""
    from craft_ray.models.embedder import encode_texts, load_sentence_transformer
    from craft_ray.store.corpus import CorpusConfig, list_shards, read_shard
    from craft_ray.store.vectors import ShardInfo, StoreInfo, write_info
    from tests.stages.retrieve.test_retrieve import write_data_file

    model = load_sentence_transformer("sentence-transformers/all-MiniLM-L6-v2", "cpu", 128,
                                      False)
    cfg = CorpusConfig(name="coffee", format="stackexchange", paths=[str(posts.parent)])
    store, infos, paths = base / "store", [], {}
    for shard in list_shards(cfg):
        recs = [r for r in read_shard(shard, cfg) if r["reject_reason"] is None]
        vec = encode_texts(model, [r["text"] for r in recs], 32)
        rel = write_data_file(store, "coffee", shard.shard, vec, [r["text_len"] for r in recs],
                              [r["row"] for r in recs])
        infos.append(ShardInfo(corpus="coffee", shard=shard.shard, file=rel,
                               num_rows=len(recs)))
        paths[f"coffee/{shard.shard}"] = shard.path
    write_info(store, StoreInfo(model="sentence-transformers/all-MiniLM-L6-v2", dim=384,
                                shards=infos, corpora=[cfg.model_dump(mode="json")],
                                shard_paths=paths))
    return store


@pytest.fixture(scope="module")
def corpus_samples(tmp_path_factory, ray_local) -> Path:
    """RUN/retrieve/corpus_samples.parquet: one real retrieval shared by every task."""
    from craft_ray.stages.retrieve.config import RetrieveStageConfig
    from craft_ray.stages.retrieve.stage import run_retrieve

    base = tmp_path_factory.mktemp("filter_tasks")
    posts = _posts_slice(COFFEE, base / "corpus" / "coffee" / "Posts.xml", 120)
    run = base / "shared"
    stats = run_retrieve(RetrieveStageConfig.model_validate({
        "run_dir": str(run),
        "retrieve": {"fewshots": {"path": str(FEWSHOTS / "medqa.jsonl"), "limit": 8},
                     "store": str(_store(base, posts)), "k": N_DOCS, "mode": "mixed",
                     "write_jsonl": False}}))
    assert stats["rows_out"] == N_DOCS
    return run / "retrieve" / "corpus_samples.parquet"


def _generate(task_name: str, docs: list[dict], tok, generator, run: Path) -> dict:
    """RUN/generate/{raw,clean,rejects}.parquet for one task, as ``run_generate`` splits them."""
    from craft_ray.stages.generate.parse import parse_batch, split_outputs
    from craft_ray.stages.generate.prompts import (
        PromptSettings,
        build_prompt_rows,
        make_shot_pool,
        prompt_schema,
    )
    from craft_ray.tasks.fewshots import FewShotConfig

    task, g = get_task(task_name), GEN[task_name]
    pool = make_shot_pool(task, FewShotConfig(path=str(FEWSHOTS / f"{task_name}.jsonl"),
                                              limit=N_SHOTS), text_max_chars=600)
    st = PromptSettings(task_name=task_name, num_shots=g["num_shots"], samples_per_doc=1,
                        seed=0, max_new_tokens=g["max_new_tokens"],
                        max_prompt_tokens=g.get("max_prompt_tokens", 1500),
                        long_prompt="truncate_text", min_text_tokens=64,
                        guided_max_string_chars=g.get("cap", 60))
    rows = build_prompt_rows(docs, task, pool, st, tok)
    kept = pa.Table.from_pylist([r for r in rows if not r["drop_reason"]],
                                schema=prompt_schema())
    parsed = parse_batch(generator(kept), task_name).to_pylist()
    out = split_outputs(parsed, task)
    (run / "generate").mkdir(parents=True)
    for name, table in out.items():
        pq.write_table(table, run / "generate" / f"{name}.parquet")
    return {"prompts": len(rows), "generations": len(parsed),
            "clean": out["clean"].num_rows,
            "rejects": out["rejects"].column("reject_reason").to_pylist()}


@pytest.fixture(scope="module")
def generated(corpus_samples, tiny_causal_lm, tmp_path_factory) -> dict[str, dict]:
    """Per task: its run directory (with generate/ outputs) and generation counts."""
    from craft_ray.backends.hf import HFGenerator
    from craft_ray.models.tokenizers import load_chat_tokenizer

    docs = pq.read_table(corpus_samples).select(["doc_id", "corpus", "text",
                                                 "fewshot_ids"]).to_pylist()
    tok = load_chat_tokenizer(str(tiny_causal_lm))
    generator = HFGenerator(str(tiny_causal_lm), None,
                            {"generate_batch_size": 8, "torch_threads": 1},
                            {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 0,
                             "guided": True})
    base = tmp_path_factory.mktemp("filter_tasks_gen")
    return {t: {"run": base / t, "gen": _generate(t, docs, tok, generator, base / t)}
            for t in TASKS}


def _filter_cfg(run: Path, task: str, **over):
    from craft_ray.stages.filter.config import FilterStageConfig

    eval_set = {"name": "medqa_slice", "path": str(EVAL_MEDQA),
                "text_fields": ["question", "options"]}
    section = {"task": task,
               "fewshots": {"path": str(FEWSHOTS / f"{task}.jsonl"), "limit": N_SHOTS},
               "decontamination": {"eval_sets": [eval_set]},
               "dedup": {"semantic": {"num_clusters": 1}},
               "datasets": {"sizes": {"S": N_SHOTS + 1, "M": N_SHOTS + 3, "XL": 1000},
                            "seed": 7},
               **over}
    return FilterStageConfig.model_validate({"run_dir": str(run), "filter": section})


@pytest.mark.parametrize("task", TASKS)
def test_filter_on_real_generation_outputs(task, generated, caplog):
    import datasets

    from craft_ray.stages.filter.stage import run_filter

    run, gen = generated[task]["run"], generated[task]["gen"]
    t = get_task(task)
    clean = pq.read_table(run / "generate" / "clean.parquet")
    # every prompt fitted and was generated; each task yields clean rows (guided, compact JSON)
    assert gen["prompts"] == gen["generations"] == N_DOCS
    assert gen["clean"] == clean.num_rows >= 3, gen["rejects"]
    caplog.set_level("WARNING")
    # semantic dedup (a MiniLM actor) once, on the task with the longest samples
    stats = run_filter(_filter_cfg(run, task, dedup={"semantic": {
        "enabled": task == "summarization", "num_clusters": 1}}))
    out = run / "filter"

    # accounting: every step's rows_out feeds the next; drops are in rejects/ with a reason
    steps = stats["steps"]
    assert [s["step"] for s in steps] == ["exact_dedup", "fewshot_leakage", "decontamination",
                                          "fuzzy_dedup"] + (["semantic_dedup"] if task ==
                                                            "summarization" else [])
    assert stats["rows_in"] == clean.num_rows == steps[0]["rows_in"]
    for a, b in zip(steps, steps[1:]):
        assert a["rows_out"] == b["rows_in"]
    for s in steps:
        assert s["rows_in"] - s["dropped"] == s["rows_out"] == s["rows_in"] - sum(
            s["reasons"].values())
    dropped = sum(s["dropped"] for s in steps)
    survivors = pq.read_table(out / "survivors")
    assert survivors.num_rows == stats["rows_out"] == steps[-1]["rows_out"] >= 1
    if dropped:
        rejects = pq.read_table(out / "rejects").to_pylist()
        assert len(rejects) == dropped and all(r["reject_reason"] for r in rejects)
    assert set(survivors.column("sample_id").to_pylist()) <= set(
        clean.column("sample_id").to_pylist())

    # sizes: those the survivors allow are built and nested, XL takes the too-few path
    sizes = {"S": N_SHOTS + 1, "M": N_SHOTS + 3}
    want = {k for k, v in sizes.items() if v - N_SHOTS <= survivors.num_rows}
    assert set(stats["datasets"]) == want and "S" in want
    assert set(stats["sizes_skipped"]) == {"XL", *(set(sizes) - want)}
    assert stats["sizes_skipped"]["XL"]["available"] == survivors.num_rows
    assert any("size(s)" in r.message and "XL" in r.message and "built: S" in r.message
               for r in caplog.records)
    assert not (out / "datasets" / "XL").exists()
    loaded = {k: datasets.load_from_disk(str(out / "datasets" / k / "hf")) for k in want}
    for name, ds in loaded.items():
        assert len(ds) == sizes[name] and sum(ds["is_few_shot"]) == N_SHOTS
        assert ds.column_names[:len(t.record_fields) + 1] == [*t.record_fields, "is_few_shot"]
        assert {"sample_id", "doc_id", "corpus", "fewshot_ids"} <= set(ds.column_names)
        for row in ds:
            rec = {f: row[f] for f in t.record_fields}
            if not row["is_few_shot"]:
                # the task's record survives the stage unchanged (lists stay lists, ...)
                assert t.validate(rec) == rec
        assert pq.read_table(out / "datasets" / name / "data.parquet").column(
            "sample_id").to_pylist() == ds["sample_id"]
        jl = (out / "datasets" / name / "data.jsonl").read_text().splitlines()
        assert [json.loads(x)["sample_id"] for x in jl] == ds["sample_id"]
        card = (out / "datasets" / name / "README.md").read_text()
        assert f"# {task} — size {name}" in card and "| exact_dedup |" in card
        assert "| coffee |" in card and "load_from_disk" in card
    if {"S", "M"} <= want:
        assert set(loaded["S"]["sample_id"]) < set(loaded["M"]["sample_id"])

    # decontamination report: the eval set at 13- and 5-grams, per built dataset too
    rep = json.loads((out / "decontamination.json").read_text())
    med = rep["eval_sets"]["medqa_slice"]
    assert med["items"] == 60 and {"13", "5"} <= set(med)
    assert med["13"]["samples"] == steps[2]["rows_in"]
    assert set(rep["datasets"]) == want
    assert (out / "_SUCCESS").is_file()


def test_llm_judge_scores_real_samples(generated, corpus_samples, tiny_causal_lm):
    """The judge through the hf backend on medqa's generated samples: every reply parses to
    1-10 scores (compact guided JSON), scores land in judge_* columns, the threshold drops
    rows with their reason into judge_rejects/, and stats.json counts them."""
    from craft_ray.stages.filter.stage import run_filter

    src = generated["medqa"]["run"]
    run = src.parent / "medqa-judge"
    (run / "generate").mkdir(parents=True)
    (run / "generate" / "clean.parquet").write_bytes(
        (src / "generate" / "clean.parquet").read_bytes())
    n = pq.read_table(run / "generate" / "clean.parquet").num_rows
    cfg = _filter_cfg(run, "medqa", decontamination={"enabled": False},
                      dedup={"exact": {"enabled": False}, "fuzzy": {"enabled": False},
                             "semantic": {"enabled": False}},
                      judge={"enabled": True, "backend": "hf", "model": str(tiny_causal_lm),
                             "doc_texts": str(corpus_samples), "temperature": 1.0, "seed": 3,
                             "hf": {"batch_size": 16, "generate_batch_size": 16,
                                    "torch_threads": 1},
                             "min_scores": {"relevance": 5, "coverage": 1,
                                            "correctness": 1}})
    stats = run_filter(cfg)
    judge = stats["steps"][-1]
    assert judge["step"] == "judge"
    n_in = stats["steps"][0]["rows_out"]  # after the leakage filter
    assert judge["rows_in"] == n_in and n_in <= n
    crit = ("relevance", "coverage", "correctness")
    out = run / "filter"
    survivors = pq.read_table(out / "survivors").to_pylist()
    rejects = pq.read_table(out / "judge_rejects").to_pylist()
    # every reply parsed: no judge_unparseable / backend errors / missing documents
    assert set(judge["reasons"]) == {"judge_low_score"}
    assert judge["dropped"] == len(rejects) == stats["rejects"]["judge_low_score"]
    assert len(survivors) == stats["rows_out"] == n_in - len(rejects)
    assert survivors and rejects  # sampled scores: some pass, some fall below 5
    for r in survivors + rejects:
        assert all(isinstance(r[f"judge_{c}"], int) and 1 <= r[f"judge_{c}"] <= 10
                   for c in crit)
    assert all(r["judge_relevance"] >= 5 for r in survivors)
    for r in rejects:
        assert r["reject_step"] == "judge" and r["judge_relevance"] < 5
        assert r["reject_detail"] == f"relevance={r['judge_relevance']}<5"
    # the scores travel into the final datasets
    s = pq.read_table(out / "datasets" / "S" / "data.parquet")
    assert {f"judge_{c}" for c in crit} <= set(s.column_names)
