"""Retrieval metrics (hand-computed and against ranx), BEIR loading, and the whole
eval-retrieval pipeline on a small real BEIR folder built from a StackExchange dump."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from craft_ray.retrieval.evaluation import (
    BeirError,
    RetrievalEvalConfig,
    evaluate_run,
    load_beir,
    query_metrics,
    run_eval_retrieval,
)

BEIR_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "retrieval" / "coffee_beir"


def test_metrics_hand_computed() -> None:
    # Relevant: d1 (1), d2 (2); d9 judged non-relevant (0). Ranking: d9, d3, d2, d1.
    m = query_metrics({"d1": 1, "d2": 2, "d9": 0}, ["d9", "d3", "d2", "d1"], [1, 3, 5])
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["ndcg@1"] == 0.0
    assert m["ndcg@3"] == pytest.approx((2 / math.log2(4)) / idcg)
    assert m["ndcg@5"] == pytest.approx((2 / math.log2(4) + 1 / math.log2(5)) / idcg)
    assert m["mrr@1"] == 0.0 and m["mrr@3"] == pytest.approx(1 / 3)
    assert m["recall@3"] == 0.5 and m["recall@5"] == 1.0
    # Perfect ranking: all 1.0; empty ranking: all 0.
    assert set(query_metrics({"a": 3, "b": 1}, ["a", "b"], [2]).values()) == {1.0}
    assert set(query_metrics({"a": 1}, [], [10]).values()) == {0.0}
    # Mean over qrels queries; a query missing from the run counts as 0.
    avg = evaluate_run({"q1": {"a": 1}, "q2": {"b": 1}}, {"q1": ["a"]}, [1])
    assert avg == {"ndcg@1": 0.5, "mrr@1": 0.5, "recall@1": 0.5}


def test_metrics_match_ranx() -> None:
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(60)]
    qrels, run, ranx_run = {}, {}, {}
    for q in range(25):
        rel_docs = rng.choice(docs, size=int(rng.integers(1, 6)), replace=False)
        qrels[f"q{q}"] = {str(d): int(rng.integers(1, 4)) for d in rel_docs}
        ranked = [str(d) for d in rng.permutation(docs)[:30]]
        run[f"q{q}"] = ranked
        ranx_run[f"q{q}"] = {d: float(30 - i) for i, d in enumerate(ranked)}
    cut = [1, 5, 10, 100]
    ours = evaluate_run(qrels, run, cut)
    names = [f"{m}@{k}" for m in ("ndcg", "mrr", "recall") for k in cut]
    ref = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(ranx_run), names)
    for n in names:
        assert ours[n] == pytest.approx(float(ref[n]), abs=1e-5), n


def test_load_beir_and_errors(tmp_path: Path) -> None:
    beir = load_beir(BEIR_DIR, "test")
    assert len(beir.queries) == 40 and len(beir.qrels) == 40
    assert all(len(r) == 1 for r in beir.qrels.values())
    with pytest.raises(BeirError, match=r"splits here: \['test'\]"):
        load_beir(BEIR_DIR, "dev")
    with pytest.raises(BeirError, match="does not exist"):
        load_beir(tmp_path / "nope")
    bad = tmp_path / "bad"
    (bad / "qrels").mkdir(parents=True)
    (bad / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    (bad / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (bad / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq2\ta\t1\n")
    with pytest.raises(BeirError, match="1 qrels queries are not in queries.jsonl"):
        load_beir(bad)


def test_eval_pipeline_matches_in_memory_reference(ray_local, tmp_path: Path) -> None:
    """embed stage + retrieval stage give the metrics of a plain in-memory exact search."""
    from craft_ray.models.embedder import load_sentence_transformer

    cfg = RetrievalEvalConfig(data=str(BEIR_DIR), run_dir=str(tmp_path / "work"),
                              embed_batch_size=64)
    result = run_eval_retrieval(cfg)
    m = result["metrics"]
    assert result["queries"] == 40 and result["embedded"] == 120
    assert set(m) == {f"{a}@{k}" for a in ("ndcg", "mrr", "recall") for k in (1, 5, 10, 100)}
    # Reference: the same model, float32 everywhere, brute-force ranking.
    model = load_sentence_transformer("sentence-transformers/all-MiniLM-L6-v2", "cpu", None,
                                      False)
    corpus = [json.loads(x) for x in (BEIR_DIR / "corpus.jsonl").read_text().splitlines()]
    beir = load_beir(BEIR_DIR)
    d = model.encode([(c["title"] + " " + c["text"]).strip() for c in corpus],
                     normalize_embeddings=True, batch_size=32)
    q = model.encode(list(beir.queries.values()), normalize_embeddings=True)
    s = q @ d.T
    run = {qid: [corpus[j]["_id"] for j in np.argsort(-s[i], kind="stable")[:100]]
           for i, qid in enumerate(beir.queries)}
    ref = evaluate_run(beir.qrels, run)
    for key, v in ref.items():
        assert m[key] == pytest.approx(v, abs=0.02), key
    assert m["recall@100"] == 1.0  # 120 documents: every accepted answer is in the top 100
    assert m["ndcg@10"] > 0.3  # titles find their accepted answers far above chance


def test_int8_onnx_embedder_keeps_ndcg(ray_local, tmp_path: Path) -> None:
    """eval-retrieval with embed.backend=onnx, embed.quantize=int8 (set as on the command line)
    scores nDCG@10 within 0.01 of the float32 torch embedder on the BEIR fixture."""
    pytest.importorskip("onnxruntime")
    from craft_ray.config import apply_overrides, validate

    base = {"data": str(BEIR_DIR), "embed_batch_size": 64}
    fp32 = run_eval_retrieval(validate(RetrievalEvalConfig, {
        **base, "run_dir": str(tmp_path / "fp32")}, "t"))["metrics"]
    raw = apply_overrides({**base, "run_dir": str(tmp_path / "int8")},
                          ["embed.backend=onnx", "embed.quantize=int8"])
    cfg = validate(RetrievalEvalConfig, raw, "t")
    assert (cfg.embed.backend, cfg.embed.quantize) == ("onnx", "int8")
    int8 = run_eval_retrieval(cfg)["metrics"]
    assert (tmp_path / "int8" / "_models").is_dir()  # the export sits beside the run
    assert int8["ndcg@10"] == pytest.approx(fp32["ndcg@10"], abs=0.01)
    assert int8["ndcg@10"] > 0.3


def test_credentials_in_a_uri_are_refused_before_ray(tmp_path: Path, monkeypatch) -> None:
    """eval-retrieval and mine-negatives take s3:// / gs:// paths (tests/test_s3.py runs
    them on a local S3 server); a URI carrying a key is one clear error before Ray starts
    and before any request, with the key not echoed."""
    from typer.testing import CliRunner

    import craft_ray.runtime
    from craft_ray.cli import app

    started: list[object] = []
    monkeypatch.setattr(craft_ray.runtime, "init_ray", lambda *a, **k: started.append(a))
    monkeypatch.chdir(tmp_path)
    for args in [
            ["eval-retrieval", "--data", "s3://AKIAXX:SECRETXX@bucket/beir"],
            ["eval-retrieval", "--data", str(BEIR_DIR), "--out",
             "gs://bucket/m.json?secret_key=SECRETXX"],
            ["eval-retrieval", "--data", str(BEIR_DIR), "--run-dir",
             "s3://AKIAXX:SECRETXX@bucket/run"],
            ["mine-negatives", "--data", str(BEIR_DIR), "--out",
             "s3://AKIAXX:SECRETXX@bucket/neg.jsonl"]]:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "must not carry credentials" in res.output, res.output
        assert "SECRETXX" not in res.output
    assert started == [] and list(tmp_path.iterdir()) == []
