"""Hard-negative mining: merging, filtering, BM25 ranking and LLM-Embedder's output format."""

from __future__ import annotations

import json
from pathlib import Path

from craft_ray.retrieval.negatives import (
    MineNegativesConfig,
    bm25_rankings,
    merge_rankings,
    pick_negatives,
    run_mine_negatives,
)

BEIR_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "retrieval" / "coffee_beir"


def test_merge_and_pick() -> None:
    assert merge_rankings([[3, 1, 2], [1, 4], []]) == [3, 1, 4, 2]
    texts = ["pos text", "same as pos", "espresso crema", "pos text", "milk foam", "beans"]
    # 0 is the positive; 3 has the positive's exact text (a duplicate in the corpus).
    assert pick_negatives([3, 0, 2, 4, 5], [0], texts, n=10) == [2, 4, 5]
    assert pick_negatives([3, 0, 2, 4, 5], [0], texts, n=2) == [2, 4]
    # answer filter: candidates containing an answer string (any case) are not negatives.
    assert pick_negatives([2, 4, 5], [0], texts, n=10, answers=["CREMA"]) == [4, 5]


def test_bm25_ranks_lexical_match_first() -> None:
    texts = ["how to descale an espresso machine with citric acid",
             "the best grinder for pour over coffee",
             "storing roasted beans in the freezer",
             "milk frothing for cappuccino"]
    got = bm25_rankings(texts, {"q1": "descale espresso machine", "q2": "the and of"}, k=3)
    assert got["q1"][0] == 0
    assert got["q1"] == [0]  # only document 0 shares a term; no zero-score filler
    assert got["q2"] == []  # stopwords only


def test_mine_negatives_bm25_writes_llm_embedder_format(tmp_path: Path) -> None:
    out = tmp_path / "neg.jsonl"
    cfg = MineNegativesConfig(data=str(BEIR_DIR), split="test", out=str(out),
                              retrievers=["bm25"], num_negatives=5, top_k=50)
    stats = run_mine_negatives(cfg)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["queries"] == len(lines) == 40
    corpus = [json.loads(x) for x in (BEIR_DIR / "corpus.jsonl").read_text().splitlines()]
    qrels = dict(line.split("\t")[:2] for line in
                 (BEIR_DIR / "qrels" / "test.tsv").read_text().splitlines()[1:])
    for item in lines:
        assert set(item) == {"query", "pos", "neg", "pos_index", "neg_index", "query_id"}
        assert len(item["neg"]) == len(item["neg_index"]) <= 5
        # pos_index points at the accepted answer's line in corpus.jsonl
        assert [corpus[i]["_id"] for i in item["pos_index"]] == [qrels[item["query_id"]]]
        assert item["pos"] == [corpus[i]["text"] for i in item["pos_index"]]
        assert item["neg"] == [corpus[i]["text"] for i in item["neg_index"]]
        assert not set(item["neg_index"]) & set(item["pos_index"])
    assert stats["negatives_mean"] > 4  # 120 documents: almost every query gets 5
