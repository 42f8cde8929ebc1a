"""Generation strategies (issue 17): splitting, pairing, noise mixing and record contracts —
pure functions, no Ray, no model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from craft_ray.stages.generate.strategies.common import Item, StepTask, write_outputs
from craft_ray.stages.generate.strategies.cst import (
    REJECT_DUPLICATE,
    REJECT_LOW_SCORE,
    select_questions,
    split_point,
    split_tree,
)
from craft_ray.stages.generate.strategies.multihop import (
    is_unanswerable,
    pair_documents,
    pick_distractor,
)
from craft_ray.stages.generate.strategies.rag_answer import (
    chunk_text,
    mix_chunks,
    noise_chunks,
    windows,
)
from craft_ray.tasks import TaskValidationError, get_task
from craft_ray.tasks.fewshots import FewShot
from craft_ray.tasks.strategies import rag_prompt

TEXT = ("Coffee beans are roasted seeds. Roasting changes their colour and taste. Light roasts "
        "keep more acidity. Dark roasts taste bitter and smoky. Grinding size matters for "
        "extraction. Espresso needs a fine grind. French press needs a coarse grind. Water "
        "temperature should be near ninety degrees.")


# --- Context-Split-Tree ------------------------------------------------------------------


def test_split_tree_structure_spans_and_limits():
    nodes = split_tree(TEXT, min_chars=40, max_depth=2, root_id="d#cst:r")
    by_id = {n.node_id: n for n in nodes}
    root = nodes[0]
    assert (root.node_id, root.parent_id, root.depth) == ("d#cst:r", "", 0)
    assert TEXT[root.start:root.end] == TEXT.strip()
    assert max(n.depth for n in nodes) == 2
    assert len(nodes) == 7  # a full binary tree of depth 2 over this text
    for n in nodes[1:]:
        parent = by_id[n.parent_id]
        assert n.node_id.startswith(parent.node_id) and n.depth == parent.depth + 1
        assert parent.start <= n.start < n.end <= parent.end
        assert n.end - n.start >= 40
        assert TEXT[n.start].strip() and TEXT[n.end - 1].strip()  # trimmed spans
    # the two children of a node cover it (up to the whitespace at the cut)
    kids = [n for n in nodes if n.parent_id == root.node_id]
    assert len(kids) == 2 and kids[0].end <= kids[1].start
    assert TEXT[kids[0].end:kids[1].start].strip() == ""
    # sentence splitting cuts after a full stop
    assert TEXT[kids[0].end - 1] == "."


def test_split_tree_min_chars_and_depth_zero():
    assert [n.depth for n in split_tree(TEXT, 40, 0)] == [0]
    assert split_tree("short text.", 40, 3) == []
    # pieces under min_chars are not nodes: a high min_chars keeps only the root
    assert len(split_tree(TEXT, 200, 3)) == 1


def test_split_point_sentence_then_token_fallback():
    text = "One two three four five six seven eight"
    cut = split_point(text, 0, len(text), "sentences")  # no sentence end: whitespace token
    assert cut is not None and text[cut - 1] == " " and abs(cut - len(text) / 2) < 6
    assert split_point("nospaceshere", 0, 12) is None
    s = "First sentence here. Second one. Third sentence is long enough."
    assert s[split_point(s, 0, len(s), "sentences") - 2] == "."
    t = split_point(s, 0, len(s), "tokens")
    assert s[t - 1] == " "


def test_select_questions_dedups_and_keeps_the_top_fraction():
    qs = ["What is roasting?", "what is ROASTING", "How fine for espresso?",
          "Which water temperature?", "Why is dark roast bitter?"]
    scores = [0.9, 0.8, 0.7, 0.2, 0.6]
    vecs = np.eye(5, dtype=np.float32)
    vecs[4] = vecs[2]  # question 4 is a near-duplicate of question 2 (higher-scored)
    out = select_questions(qs, scores, vecs, keep_fraction=0.4, dedup_threshold=0.95)
    assert out[0] == "" and out[1] == REJECT_DUPLICATE
    assert out[2] == "" and out[4] == REJECT_DUPLICATE
    assert out[3] == REJECT_LOW_SCORE
    assert select_questions([], [], np.zeros((0, 2)), 0.5, 0.9) == []


# --- multi-hop pairing -----------------------------------------------------------------


def _unit(rows):
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_pair_documents_disjoint_thresholded_most_similar_first():
    vecs = _unit([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.95, 0.3], [0, 0, 1], [1, 0, 0]])
    pairs = pair_documents(vecs, min_similarity=0.5, max_similarity=0.999)
    used = [i for p in pairs for i in p[:2]]
    assert len(used) == len(set(used))  # each document in one pair at most
    assert all(i < j and 0.5 <= s < 0.999 for i, j, s in pairs)
    assert [p[2] for p in pairs] == sorted((p[2] for p in pairs), reverse=True)
    assert (0, 5) not in {(i, j) for i, j, _ in pairs}  # identical docs: near-duplicates
    assert {(0, 1), (2, 3)} <= {(i, j) for i, j, _ in pairs}
    assert 4 not in used  # no neighbour above min_similarity
    assert len(pair_documents(vecs, 0.5, 0.999, max_pairs=1)) == 1
    assert pair_documents(vecs[:1], 0.0, 1.0) == []


def test_pick_distractor_and_unanswerable_draw():
    vecs = _unit([[1, 0], [0.9, 0.1], [0, 1], [-1, 0.01]])
    assert pick_distractor(vecs, 0, {0, 1}) == 3
    assert pick_distractor(vecs, 0, {0, 1, 2, 3}) is None
    draws = [is_unanswerable(0, f"pair{i}", 0.25) for i in range(400)]
    assert 60 < sum(draws) < 140
    assert draws == [is_unanswerable(0, f"pair{i}", 0.25) for i in range(400)]  # rerun-stable
    assert not any(is_unanswerable(0, f"p{i}", 0.0) for i in range(50))


# --- RAG chunks and noise --------------------------------------------------------------


def test_chunk_text_and_windows():
    chunks = chunk_text(TEXT, 80)
    assert all(len(c) <= 80 for c in chunks) and len(chunks) >= 3
    assert " ".join(chunks).split() == TEXT.split()  # nothing lost or reordered
    long = chunk_text("word " * 100, 50)
    assert all(len(c) <= 50 for c in long) and " ".join(long).split() == ["word"] * 100
    w = windows(chunks, 2, 10)
    assert [s for s, _ in w] == list(range(0, 2 * len(w), 2))
    assert w[0][1] == "\n".join(chunks[:2])
    assert len(windows(chunks, 2, 1)) == 1
    assert windows(["only"], 3, 5) == [(0, "only")]  # a short only run is kept
    assert chunk_text("  ", 50) == []


def test_noise_from_store_neighbours_and_mixing():
    vecs = _unit([[1, 0, 0], [0.9, 0.2, 0], [0.8, 0.3, 0], [0, 0, 1]])
    doc_chunks = [["gold a", "gold b"], ["n1 a", "n1 b"], ["n2 a"], ["far a", "far b"]]
    rng = random.Random(0)
    noise, src = noise_chunks(0, vecs, doc_chunks, neighbours=2, k=3, rng=rng,
                              gold="gold a\ngold b")
    assert len(noise) == 3 and set(src) <= {1, 2}  # only from the 2 nearest, never itself
    assert not any(c.startswith(("gold", "far")) for c in noise)
    chunks, gi = mix_chunks("GOLD", noise, random.Random(1))
    assert chunks[gi] == "GOLD" and sorted(c for c in chunks if c != "GOLD") == sorted(noise)
    positions = {mix_chunks("GOLD", noise, random.Random(s))[1] for s in range(30)}
    assert positions == {0, 1, 2, 3}  # the gold chunk moves
    assert mix_chunks("G", [], random.Random(0)) == (["G"], 0)


# --- record contracts --------------------------------------------------------------------


def _cst_record(**kw):
    rec = {"question": "What changes when beans roast?", "answer": "Colour and taste.",
           "context": TEXT, "depth": 1, "span_start": 0, "span_end": 40, "node_id": "d#cst:r0",
           "parent_id": "d#cst:r", "score": 0.5}
    rec.update(kw)
    return rec


def _rag_record(**kw):
    rec = {"system": "Answer from the chunks.", "question": "Which grind for espresso?",
           "context": "Espresso needs a fine grind.", "chunks_rag": [
               "Beer is brewed.", "Espresso needs a fine grind.", "Hops add bitterness."],
           "gold_index": 1, "answer": "A fine grind.", "relevance": 5, "global_relevance": 4,
           "coverage": 5}
    rec.update(kw)
    return rec


def _mh_record():
    sub = {"question": "What does roasting change?", "paragraph": "P1", "long_answer": "Taste.",
           "unanswerable": False}
    return {"question": "How do roast and grind shape espresso?", "final_answer": "Both.",
            "thought": "Combine.", "sub_questions": [sub, {**sub, "unanswerable": True}],
            "doc_ids": ["a", "b"]}


def test_record_contracts_and_training_pairs():
    cst = get_task("cst")
    rec = cst.validate(_cst_record())
    assert list(rec) == cst.record_fields
    assert cst.training_pair(rec) == (rec["question"], rec["answer"])
    with pytest.raises(TaskValidationError):
        cst.validate(_cst_record(span_end=0))
    with pytest.raises(TaskValidationError):
        cst.validate(_cst_record(question="?"))

    rag = get_task("rag_answer")
    rec = rag.validate(_rag_record())
    assert list(rec) == rag.record_fields and rec["relevance"] == 5.0
    prompt, completion = rag.training_pair(rec)
    assert completion == "A fine grind."
    assert all(c in prompt for c in rec["chunks_rag"]) and "[2] Espresso" in prompt
    assert prompt == rag_prompt(rec["system"], rec["chunks_rag"], rec["question"])
    with pytest.raises(TaskValidationError, match="gold_index"):
        rag.validate(_rag_record(gold_index=0))

    mh = get_task("multihop")
    rec = mh.validate(_mh_record())
    assert list(rec) == mh.record_fields and rec["unanswerable"] is True
    assert set(rec["sub_questions"][0]) == {"question", "paragraph", "long_answer",
                                            "unanswerable"}
    prompt, completion = mh.training_pair(rec)
    assert "[1] P1" in prompt and rec["question"] in prompt
    assert completion.endswith("Final answer: Both.") and "Thought: Combine." in completion
    bad = _mh_record()
    bad["sub_questions"] = bad["sub_questions"][:1]
    with pytest.raises(TaskValidationError, match="two sub-questions"):
        mh.validate(bad)


def test_fewshots_convert_to_each_layout():
    shot = FewShot(id="s1", text="Some source text.", instruction="What is the question here?",
                   output="The answer.")
    for name in ("cst", "multihop", "rag_answer"):
        task = get_task(name)
        rec, _ = task.convert_fewshot(shot)
        assert list(rec) == task.record_fields
        assert "What is the question here?" in task.training_pair(rec)[0]


def test_step_task_holds_outputs_to_the_schema():
    schema = {"type": "object", "properties": {"questions": {
        "type": "array", "items": {"type": "string", "minLength": 8}, "maxItems": 2}},
        "required": ["questions"], "additionalProperties": False}
    st = StepTask("rag_questions", schema)
    assert st.parse('x {"questions": ["  What is a roast?  "]}') == {
        "questions": ["  What is a roast?  "]}
    with pytest.raises(TaskValidationError, match="rag_questions: 'questions/0'"):
        st.parse('{"questions": ["short"]}')
    with pytest.raises(TaskValidationError, match="'answer' is blank"):
        StepTask("cst_answers", {"type": "object", "properties": {
            "answer": {"type": "string", "minLength": 1}}}).parse('{"answer": "   "}')
    with pytest.raises(TaskValidationError, match="maxItems"):
        st.parse(json.dumps({"questions": ["What is this one?"] * 3}))


def test_write_outputs_accounts_and_rejects_contract_breaks(tmp_path):
    import pyarrow.parquet as pq

    from craft_ray.stages.generate.strategies.rag_answer import record_types

    ok = Item("d#rag:c0/q0", "d", "se", ["s1"], ["f1"], record=_rag_record(),
              prompt_hash="h", extra={"noise_doc_ids": ["e"]})
    broken = Item("d#rag:c0/q1", "d", "se", ["s1"], ["f1"], record=_rag_record(gold_index=2))
    failed = Item("d#rag:c2", "d", "se", ["s1"], ["f1"])
    failed.reject("rag_questions", "Malformed or truncated JSON.", text="{")
    counts = write_outputs(tmp_path, get_task("rag_answer"), [ok, broken, failed],
                           "rag_answer", record_types)
    assert counts["clean"] == 1 and sum(counts["rejects"].values()) == 2
    clean = pq.read_table(tmp_path / "clean.parquet").to_pylist()
    assert clean[0]["sample_id"] == "d#rag:c0/q0" and clean[0]["task"] == "rag_answer"
    assert clean[0]["fewshot_ids"] == ["s1"] and clean[0]["noise_doc_ids"] == ["e"]
    assert clean[0]["chunks_rag"][clean[0]["gold_index"]] == clean[0]["context"]
    rej = {r["sample_id"]: r for r in pq.read_table(tmp_path / "rejects.parquet").to_pylist()}
    assert rej["d#rag:c0/q1"]["step"] == "record"
    assert "gold_index" in rej["d#rag:c0/q1"]["reject_reason"]
    assert rej["d#rag:c2"]["step"] == "rag_questions"
    lines = (tmp_path / "clean.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["answer"] == "A fine grind."


def test_generate_config_ties_strategy_and_task():
    from craft_ray.stages.generate import GenerateConfig

    base = {"fewshots": {"path": "x.jsonl"}, "model": "m"}
    assert GenerateConfig(**base, task="medqa").strategy == "craft"
    assert GenerateConfig(**base, task="cst", strategy="cst").cst.max_depth == 3
    with pytest.raises(ValueError, match="set generate.task: multihop"):
        GenerateConfig(**base, task="medqa", strategy="multihop")
    with pytest.raises(ValueError, match="set generate.strategy: rag_answer"):
        GenerateConfig(**base, task="rag_answer")


def test_strategy_records_load_as_generative_eval_sets(tmp_path):
    from craft_ray.evalsets import EvalSetConfig, load_eval_set

    p = tmp_path / "rag.jsonl"
    p.write_text(json.dumps({**_rag_record(), "sample_id": "x1"}) + "\n" +
                 json.dumps(_rag_record(gold_index=0)) + "\n")
    es = EvalSetConfig(name="rag_answer", path=str(p))
    assert es.kind == "generative" and es.task == "rag_answer"
    items, rejects = load_eval_set(es)
    assert [it.id for it in items] == ["x1"] and rejects[0].reason == "bad_record"
    prompt, ref = get_task("rag_answer").training_pair(items[0].record)
    assert ref == "A fine grind." and "Hops add bitterness." in prompt


def test_report_shows_samples_per_strategy(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from craft_ray.report.html import build_report

    (tmp_path / "generate").mkdir()
    rows = [{"task": "rag_answer", "question": "Which grind for espresso?", "sample_text": "x"},
            {"task": "cst", "question": "What changes when beans roast?", "sample_text": "y"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "generate" / "clean.parquet")
    page = build_report(tmp_path).read_text()
    assert "<h3>cst (1 clean)</h3>" in page and "<h3>rag_answer (1 clean)</h3>" in page
    assert "Which grind for espresso?" in page


@pytest.mark.parametrize("name", ["cst", "multihop", "rag_answer"])
def test_example_configs_load_and_wire_the_strategy(name):
    from pathlib import Path

    from craft_ray.config import load_config
    from craft_ray.pipeline import PipelineConfig

    path = Path(__file__).resolve().parents[3] / "configs" / "examples" / f"{name}.yaml"
    assert path.read_text().startswith(f"# craft-ray run --config configs/examples/{name}.yaml")
    cfg = load_config(PipelineConfig, path)
    assert cfg.generate.strategy == cfg.generate.task == cfg.filter.task == cfg.train.task == name
    assert cfg.evaluate is not None and cfg.embed is not None
