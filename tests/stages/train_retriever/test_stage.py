"""train-retriever on Ray Train with the bundled all-MiniLM-L6-v2: the CLI run improves the
held-out nDCG@10 of the bundled coffee BEIR fixture (eval-retrieval --model OUT agrees), and a
2-worker DDP run, stopped and resumed, makes the same steps as a 1-worker run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

BEIR_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "retrieval" / "coffee_beir"


def split_beir(dst: Path, n_train: int = 24, seed: int = 0) -> Path:
    """The coffee fixture with its 40 judged queries split (seeded) into qrels/train.tsv and
    a held-out qrels/test.tsv."""
    dst.mkdir(parents=True)
    shutil.copy(BEIR_DIR / "corpus.jsonl", dst / "corpus.jsonl")
    shutil.copy(BEIR_DIR / "queries.jsonl", dst / "queries.jsonl")
    lines = (BEIR_DIR / "qrels" / "test.tsv").read_text().splitlines()
    rows = [ln.split("\t") for ln in lines[1:] if ln.strip()]
    qids = sorted({r[0] for r in rows})
    perm = np.random.default_rng(seed).permutation(len(qids))
    train = {qids[i] for i in perm[:n_train]}
    (dst / "qrels").mkdir()
    for split, keep in (("train", True), ("test", False)):
        body = [ln for ln, r in zip(lines[1:], rows) if (r[0] in train) == keep]
        (dst / "qrels" / f"{split}.tsv").write_text("\n".join([lines[0], *body]) + "\n")
    return dst


def test_cli_train_retriever_improves_heldout_ndcg_and_eval_retrieval_agrees(
        ray_local, tmp_path):
    from typer.testing import CliRunner

    from craft_ray.cli import app

    data = split_beir(tmp_path / "coffee")
    out = tmp_path / "retriever"
    args = ["train-retriever", "--data", str(data), "--out", str(out), "--split", "train",
            "--set", "epochs=3", "--set", "batch_size=8", "--set", "learning_rate=5e-5",
            "--set", "warmup_ratio=0", "--set", "max_seq_length=128", "--set", "seed=0",
            "--set", "negatives.per_query=3", "--set", "negatives.mine_keep=10",
            "--set", "negatives.mine_retrievers=[bm25]", "--set", "eval_split=test"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert metrics["finished"] is True and metrics["steps"] == 9  # 24 // 8 x 3 epochs
    print("held-out before", before, "after", after)
    assert after["ndcg@10"] > before["ndcg@10"]
    assert (out / "_SUCCESS").is_file() and (out / "modules.json").is_file()

    # the output folder is a sentence-transformers model the other commands accept
    res = CliRunner().invoke(app, ["eval-retrieval", "--data", str(data), "--split", "test",
                                   "--model", str(out), "--run-dir", str(tmp_path / "ev"),
                                   "--out", str(tmp_path / "ev.json")])
    assert res.exit_code == 0, res.output
    ev = json.loads((tmp_path / "ev.json").read_text())["metrics"]
    assert ev["ndcg@10"] == pytest.approx(after["ndcg@10"], abs=1e-4)

    # bad data: one clear line naming the file, exit code 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": []}\n')
    res = CliRunner().invoke(app, ["train-retriever", "--data", str(bad), "--out",
                                   str(tmp_path / "m2")])
    assert res.exit_code == 2
    assert str(bad) in res.output and "no positive" in res.output


def _probe(model_dir: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(str(model_dir), device="cpu")
    return m.encode(["How fine should espresso be ground?", "Storing roasted beans"],
                    normalize_embeddings=True)


def test_two_workers_stopped_and_resumed_equal_one_worker(ray_local, tmp_path):
    from craft_ray.stages.train_retriever import TrainRetrieverConfig, run_train_retriever

    texts = [json.loads(x)["text"] for x in (BEIR_DIR / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(x)["text"] for x in (BEIR_DIR / "queries.jsonl").read_text()
               .splitlines()]
    data = tmp_path / "train.jsonl"  # LLM-Embedder format, 2 negatives, teacher scores
    data.write_text("".join(json.dumps({"query": q, "pos": [texts[i]],
                                        "neg": [texts[i + 40], texts[i + 80]],
                                        "teacher_scores": [0.0, -1.0 - i % 3, -2.0]}) + "\n"
                            for i, q in enumerate(queries[:8])))
    # contrastive (in-batch + hard negatives) and KL distillation, both across the workers
    common = {"data": str(data), "batch_size": 4, "epochs": 1, "max_seq_length": 32,
              "negatives": {"per_query": 1}, "dropout": False, "learning_rate": 1e-4,
              "loss": {"distill_weight": 0.5}, "eval_split": None, "seed": 5}
    one = run_train_retriever(TrainRetrieverConfig(out=str(tmp_path / "one"), **common))
    assert one["finished"] is True and one["steps"] == 2

    cfg2 = {**common, "num_workers": 2, "out": str(tmp_path / "two")}
    stopped = run_train_retriever(TrainRetrieverConfig(stop_after_steps=1, **cfg2))
    assert stopped["finished"] is False and stopped["steps"] == 1
    assert not (tmp_path / "two" / "_SUCCESS").exists()
    two = run_train_retriever(TrainRetrieverConfig(**cfg2))  # resumes at step 2
    assert two["finished"] is True and two["steps"] == 2

    def losses(name):
        rows = (tmp_path / f"{name}.work" / "metrics.jsonl").read_text().splitlines()
        return [(json.loads(r)["step"], json.loads(r)["loss"]) for r in rows]

    l1, l2 = losses("one"), losses("two")
    assert [s for s, _ in l2] == [1, 2]  # step 1 from the stopped run, step 2 resumed
    assert [v for _, v in l2] == pytest.approx([v for _, v in l1], rel=1e-4)
    first = json.loads((tmp_path / "two.work" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["distill"] > 0 and first["contrastive"] > 0
    e1, e2 = _probe(tmp_path / "one"), _probe(tmp_path / "two")
    np.testing.assert_allclose(e2, e1, atol=2e-4)
    base = _probe(Path(__import__("craft_ray.models.embedder", fromlist=["x"])
                       .resolve_model("all-MiniLM-L6-v2")))
    assert np.abs(e1 - base).max() > 1e-3  # and training did move the model
