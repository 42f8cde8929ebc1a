"""Generation strategies end to end (issue 17): each strategy through run_generate on local
Ray with the tiny random LM on the hf backend, guided decoding, a handful of documents and a
small embedding store. The tiny model is untrained, so the assertions are on the contracts
(accounting, layout, provenance, reasons), not on the content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from craft_ray.tasks import get_task
from tests.conftest import FIXTURES

GEN = FIXTURES / "generate"
SHOTS = GEN / "fewshots_short.jsonl"


def _setup(run_dir: Path) -> list[str]:
    """RUN_DIR/retrieve/corpus_samples.parquet (6 coffee posts) and RUN_DIR/embed/store with
    three clusters of two neighbouring documents each."""
    from craft_ray.store.vectors import (
        ShardInfo,
        StoreInfo,
        embedding_array,
        write_info,
        write_store_table,
    )

    docs = [json.loads(line) for line in (GEN / "corpus_samples.jsonl").open()]
    rows = [{"doc_id": d["doc_id"], "corpus": d["corpus"], "text": d["text"],
             "fewshot_ids": d["fewshot_ids"]} for d in docs]
    (run_dir / "retrieve").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "retrieve" / "corpus_samples.parquet")
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3]
    vecs = np.stack([centres[i // 2] + 0.1 * rng.standard_normal(8) for i in range(len(docs))])
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float16)
    store = run_dir / "embed" / "store"
    (store / "data" / "coffee").mkdir(parents=True)
    ids = [d["doc_id"] for d in docs]
    write_store_table(pa.table({
        "doc_id": pa.array(ids), "row": pa.array(range(len(ids)), type=pa.int64()),
        "text_len": pa.array([len(d["text"]) for d in docs], type=pa.int32()),
        "embedding": embedding_array(vecs)}), store / "data" / "coffee" / "Posts.parquet")
    write_info(store, StoreInfo(model="test", dim=8, shards=[ShardInfo(
        corpus="coffee", shard="Posts.xml", file="data/coffee/Posts.parquet",
        num_rows=len(ids))]))
    return ids


def _run(run_dir: Path, model: Path, strategy: str, limit: int | None = None, **section
         ) -> dict:
    from craft_ray.config import validate
    from craft_ray.stages.generate import GenerateStageConfig, run_generate

    gen = {"strategy": strategy, "task": strategy, "fewshots": {"path": str(SHOTS)},
           "model": str(model), "num_shots": 1, "fewshot_text_max_chars": 200,
           "max_prompt_tokens": 3000, "max_new_tokens": 160, "guided_max_string_chars": 40,
           "hf": {"batch_size": 32, "generate_batch_size": 16, "torch_threads": 1},
           "limit": limit, strategy: section}
    cfg = validate(GenerateStageConfig, {"run_dir": str(run_dir), "generate": gen}, "test")
    return run_generate(cfg)


def _outputs(run_dir: Path, strategy: str) -> tuple[list[dict], list[dict]]:
    out = run_dir / "generate"
    assert (out / "_SUCCESS").is_file() and (out / "stats.json").is_file()
    clean = pq.read_table(out / "clean.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    task = get_task(strategy)
    for r in clean:  # every clean row is a valid record with its provenance
        assert task.validate(r) == {k: r[k] for k in task.record_fields}
        assert r["task"] == strategy and r["fewshot_ids"] and r["doc_id"] and r["prompt_hash"]
        assert r["sample_text"] == task.sample_text(task.validate(r))
    for r in rejects:
        assert r["reject_reason"] and r["step"]
    lines = (out / "clean.jsonl").read_text().splitlines()
    assert len(lines) == len(clean)
    return clean, rejects


def test_cst_end_to_end(ray_local, tiny_causal_lm, tmp_path):
    _setup(tmp_path)
    stats = _run(tmp_path, tiny_causal_lm, "cst", limit=3, min_chars=150, max_depth=1,
                 keep_fraction=0.5)
    clean, rejects = _outputs(tmp_path, "cst")
    assert stats["rows_in"] == stats["nodes"] == len(clean) + len(rejects)
    assert stats["nodes_per_depth"][0] == 3  # one root per document
    assert stats["nodes_per_depth"][1] == 6  # every root of 569-851 chars splits in two
    assert (tmp_path / "generate" / "steps" / "cst_questions.parquet").is_file()
    scored = stats["questions_scored"]
    # the scorer keeps ceil(half) of the scored questions at most (duplicates drop more)
    assert len([r for r in rejects if r["step"] == "cst_score"]) >= scored // 2
    for r in clean:
        doc = r["doc_id"]
        assert r["node_id"].startswith(f"{doc}#cst:r") and len(r["node_id"]) - len(
            f"{doc}#cst:r") == r["depth"]
        assert r["parent_id"] == ("" if r["depth"] == 0 else r["node_id"][:-1])
        assert r["span_end"] - r["span_start"] == len(r["context"]) >= 150
        assert -1.0 <= r["score"] <= 1.0


def test_multihop_end_to_end(ray_local, tiny_causal_lm, tmp_path):
    ids = _setup(tmp_path)
    stats = _run(tmp_path, tiny_causal_lm, "multihop", min_similarity=0.5, max_similarity=0.999,
                 unanswerable_fraction=0.5, paragraph_max_chars=300,
                 long_answer_temperature=0.7)  # greedy: the untrained model writes blanks
    clean, rejects = _outputs(tmp_path, "multihop")
    assert stats["pairs"] == 3 and stats["rows_in"] == 3 == len(clean) + len(rejects)
    expected = {frozenset(ids[i:i + 2]) for i in (0, 2, 4)}  # the store's neighbours
    for r in clean + rejects:
        a, b = r["sample_id"].split("#multihop")[0].split("+")
        assert frozenset((a, b)) in expected
    for r in clean:
        assert len(r["sub_questions"]) == 2 and r["doc_ids"][:2] == sorted(
            r["doc_ids"][:2], key=ids.index)
        assert r["unanswerable"] == r["sub_questions"][1]["unanswerable"]
        assert len(r["doc_ids"]) == (3 if r["unanswerable"] else 2)
        assert r["sub_questions"][0]["paragraph"] and r["final_answer"]
    steps = tmp_path / "generate" / "steps"
    assert {p.stem for p in steps.glob("*.parquet")} >= {"multihop_decompose"}


def test_rag_answer_end_to_end(ray_local, tiny_causal_lm, tmp_path):
    _setup(tmp_path)
    stats = _run(tmp_path, tiny_causal_lm, "rag_answer", limit=4, chunk_chars=200, chunks_per_prompt=2,
                 max_windows_per_doc=1, questions_per_prompt=2, noisy_chunks=2, neighbours=1,
                 min_score=1)
    clean, rejects = _outputs(tmp_path, "rag_answer")
    assert stats["windows"] == 4 and stats["rows_in"] == len(clean) + len(rejects)
    by_doc = {}
    for d in pq.read_table(tmp_path / "retrieve" / "corpus_samples.parquet").to_pylist():
        by_doc[d["doc_id"]] = d["text"]
    ids = list(by_doc)
    for r in clean:
        assert r["chunks_rag"][r["gold_index"]] == r["context"]
        doc_words = " ".join(by_doc[r["doc_id"]].split())
        assert all(" ".join(chunk.split()) in doc_words for chunk in r["context"].split("\n"))
        assert len(r["chunks_rag"]) == 3  # gold + 2 noisy chunks
        # noise comes from the one store neighbour of the gold document, never itself
        i = ids.index(r["doc_id"])
        assert set(r["noise_doc_ids"]) == {ids[i + 1 if i % 2 == 0 else i - 1]}
        assert all(1 <= r[k] <= 5 for k in ("relevance", "global_relevance", "coverage"))
        prompt, completion = get_task("rag_answer").training_pair(r)
        assert all(c in prompt for c in r["chunks_rag"]) and completion == r["answer"]
    assert stats["steps"]["rag_questions"]["prompts"] == 4
