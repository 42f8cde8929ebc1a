"""Runs with the run directory and the inputs on a real S3-compatible server (moto's server
mode, see ``s3_server`` in conftest), through the CLI as a user types it. Each command runs in
a subprocess whose embedded Ray starts with the test's AWS_* environment (credentials reach
the workers by inheritance, never through a runtime_env)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from craft_ray.cli import app
from craft_ray.runtime import storage
from craft_ray.store.vectors import read_info
from tests.stages.embed.test_embed import make_c4_corpus, store_rows

ROOT = Path(__file__).resolve().parents[1]
BEIR_DIR = ROOT / "tests" / "fixtures" / "retrieval" / "coffee_beir"


def _cli(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([sys.executable, "-m", "craft_ray", *args], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _embed_config(tmp_path: Path, run_dir: str, corpus: str) -> Path:
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(yaml.safe_dump({
        "run_dir": run_dir, "ray": {"num_cpus": 2},
        "embed": {"corpora": [{"name": "c4", "format": "c4", "paths": [corpus]}],
                  "max_seq_length": 64, "batch_size": 64, "encode_batch_size": 32,
                  "shards_per_wave": 1}}))
    return cfg


@pytest.mark.slow
def test_sigkill_mid_embed_then_rerun_on_s3_every_document_once(s3_bucket: str,
                                                                  tmp_path: Path):
    storage.upload(make_c4_corpus(tmp_path / "c4", shards=5, docs=10, bad=False),
                   f"{s3_bucket}/corpora/c4")
    run = f"{s3_bucket}/run"
    cfg = _embed_config(tmp_path, run, f"{s3_bucket}/corpora/c4")
    data_dir = f"{run}/embed/store/data/c4"
    proc = _cli(["embed", "--config", str(cfg)])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if storage.list_files(data_dir, ".parquet"):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_at_kill = len(storage.list_files(data_dir, ".parquet"))
    assert 1 <= done_at_kill < 5, "the kill must land part-way"
    assert not storage.exists(f"{run}/embed/_SUCCESS")

    proc = _cli(["embed", "--config", str(cfg), "--json"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "testing" not in out  # the secret never reaches the output
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["shards_resumed"] >= done_at_kill and stats["rows_out"] == 50
    rows = store_rows(f"{run}/embed/store")  # asserts no id is stored twice
    expected = {f"c4/c4-train.{s:05d}-of-00005.json.gz#{d}" for s in range(5) for d in range(10)}
    assert set(rows) == expected
    assert all(row == int(did.rsplit("#", 1)[1]) for did, (row, _) in rows.items())
    vecs = np.stack([v for _, v in rows.values()]).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)
    for name in ("_SUCCESS", "stats.json", "config.yaml", "embeddings.h5"):
        assert storage.is_file(f"{run}/embed/{name}"), name
    assert storage.list_files(f"{run}/embed/store/_parts", recursive=True) == []
    assert storage.read_json(f"{run}/summary.json")["stages"]["embed"]["rows_out"] == 50


def test_missing_bucket_is_one_clear_error_before_ray(s3_env, tmp_path: Path, monkeypatch):
    import craft_ray.runtime

    started: list[object] = []
    monkeypatch.setattr(craft_ray.runtime, "init_ray", lambda *a, **k: started.append(a))
    (tmp_path / "a.txt").write_text("x" * 300)
    cfg = _embed_config(tmp_path, str(tmp_path / "run"), str(tmp_path / "a.txt"))
    for command in ("embed", "run"):
        r = CliRunner().invoke(app, [command, "--config", str(cfg),
                                     "--set", "run_dir=s3://no-such-bucket/run"])
        assert r.exit_code == 2, r.output
        assert "s3://no-such-bucket/run" in r.output and "does not exist" in r.output
    r = CliRunner().invoke(app, ["embed", "--config", str(cfg), "--set",
                                 "embed.corpora.0.paths=[s3://no-such-bucket/c4]"])
    assert r.exit_code == 2 and "s3://no-such-bucket/c4" in r.output, r.output
    beir = str(BEIR_DIR)
    for args, named in [
            (["eval-retrieval", "--data", "s3://no-such-bucket/beir"], "no-such-bucket/beir"),
            (["eval-retrieval", "--data", beir, "--run-dir", "s3://no-such-bucket/run"],
             "no-such-bucket/run"),
            (["eval-retrieval", "--data", beir, "--out", "s3://no-such-bucket/m.json"],
             "no-such-bucket/m.json"),
            (["mine-negatives", "--data", beir, "--split", "test", "--out",
              "s3://no-such-bucket/neg.jsonl"], "no-such-bucket/neg.jsonl")]:
        monkeypatch.chdir(tmp_path)
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert f"s3://{named}" in r.output and "does not exist" in r.output, r.output
    assert not (tmp_path / "runs").exists()  # nothing was started or written
    assert started == []  # every error came before Ray would start


def demo_in_bucket(bucket: str, lm: str) -> list[str]:
    """The demo's inputs uploaded to ``bucket`` (one StackExchange site, the MedQA few-shots and
    eval set, the model) and the ``--set`` overrides of a demo run entirely on it: run_dir,
    corpus, few-shots, eval set and base model in the bucket, the tiny random LM ``lm`` in
    place of SmolLM2 (guided JSON keeps its samples parseable)."""
    for local, key in [(ROOT / "data/stackexchange/coffee.stackexchange.com",
                        "corpora/stackexchange/coffee.stackexchange.com"),
                       (ROOT / "data/fewshots/medqa.jsonl", "fewshots/medqa.jsonl"),
                       (ROOT / "data/eval/medqa_usmle_4opt_test_first60.jsonl",
                        "eval/medqa.jsonl"),
                       (Path(lm), "models/lm")]:
        storage.upload(local, f"{bucket}/{key}")
    lm = f"{bucket}/models/lm"  # generation, training and evaluation load it from the bucket
    shots = f"{{path: {bucket}/fewshots/medqa.jsonl, limit: 8}}"
    return [f"run_dir={bucket}/run", f"embed.corpora.0.paths=[{bucket}/corpora/stackexchange]",
            f"retrieve.fewshots={shots}", f"generate.fewshots={shots}",
            f"filter.fewshots={shots}", f"generate.model={lm}", f"train.base_model={lm}",
            # the tiny LM's byte-level tokens are many: room for a few-shot and a text
            "generate.max_new_tokens=96", "generate.max_prompt_tokens=3000",
            # S = the 8 few-shots (+ any survivor): buildable whatever the random LM writes
            "filter.datasets.sizes={S: 8}",
            f"evaluate.models=[{{name: base, model: {lm}}}, {{name: lora-S, model: {lm}, "
            "adapter: '{run_dir}/train/S-seed1234/adapter', size: S}]",
            f"evaluate.sets=[{{name: medqa, path: {bucket}/eval/medqa.jsonl, limit: 8}}]"]


def check_demo_in_bucket(run: str) -> None:
    """Every stage of a demo run finished in the bucket, with its outputs there."""
    for stage in ("embed", "retrieve", "generate", "filter", "train/S-seed1234", "evaluate"):
        assert storage.is_file(f"{run}/{stage}/_SUCCESS"), stage
        assert storage.is_file(f"{run}/{stage}/stats.json"), stage
    assert storage.read_json(f"{run}/embed/stats.json")["rows_out"] == 224
    assert storage.is_file(f"{run}/embed/embeddings.h5")
    assert storage.is_file(f"{run}/retrieve/corpus_samples.parquet")
    assert storage.is_file(f"{run}/generate/clean.parquet")
    gen = storage.read_json(f"{run}/generate/stats.json")  # the LM loaded from the bucket
    assert gen["backend_errors"] == 0 and gen["generations"] > 0 and gen["tokens_out"] > 0, \
        json.dumps(gen)
    assert storage.is_file(f"{run}/filter/datasets/S/hf/dataset_info.json")
    assert storage.is_file(f"{run}/train/S-seed1234/adapter/adapter_config.json")
    assert storage.list_files(f"{run}/train/S-seed1234/ray", recursive=True)  # Ray Train's
    assert storage.is_file(f"{run}/train/S-seed1234/metrics.jsonl")
    assert storage.read_json(f"{run}/evaluate/stats.json")["rows_out"] == 16  # 2 models x 8
    assert storage.is_file(f"{run}/evaluate/lora-S/medqa/predictions.parquet")
    summary = storage.read_json(f"{run}/summary.json")
    assert set(summary["stages"]) >= {"embed", "retrieve", "generate", "filter", "train",
                                      "evaluate"}
    assert "<html" in storage.read_text(f"{run}/report.html").lower()


@pytest.mark.slow
def test_demo_pipeline_with_run_dir_and_inputs_on_s3(s3_bucket: str, tiny_causal_lm: Path):
    """`craft-ray run --config configs/demo.yaml --set run_dir=s3://...` as a user types it,
    its corpus, few-shots and eval set read from the bucket too; the tiny random LM stands in
    for SmolLM2 (guided JSON keeps its samples parseable), one StackExchange site."""
    run, sets = f"{s3_bucket}/run", demo_in_bucket(s3_bucket, str(tiny_causal_lm))
    proc = _cli(["run", "--config", "configs/demo.yaml",
                 *[a for s in sets for a in ("--set", s)]])
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-6000:]
    check_demo_in_bucket(run)
    assert f"{run}/report.html" in out

    # A rerun skips every stage: the markers and config hashes live in the bucket.
    proc = _cli(["run", "--config", "configs/demo.yaml",
                 *[a for s in sets for a in ("--set", s)], "--json"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-6000:]
    results = json.loads(out.strip().splitlines()[-1])
    assert all(results[s].get("skipped") for s in ("embed", "retrieve", "generate", "filter",
                                                   "train", "evaluate")), results


def test_refused_credentials_are_one_clear_error_before_ray(tmp_path: Path, monkeypatch):
    """A second moto server that checks credentials (``INITIAL_NO_AUTH_ACTION_COUNT=0``): the
    dummy key is unknown to it, as a wrong or expired key is to S3."""
    import craft_ray.runtime
    from tests.conftest import moto_server

    started: list[object] = []
    monkeypatch.setattr(craft_ray.runtime, "init_ray", lambda *a, **k: started.append(a))
    (tmp_path / "a.txt").write_text("x" * 300)
    cfg = _embed_config(tmp_path, str(tmp_path / "run"), str(tmp_path / "a.txt"))
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with moto_server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0") as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        storage.clear_cache()
        r = CliRunner().invoke(app, ["embed", "--config", str(cfg),
                                     "--set", "run_dir=s3://some-bucket/run"])
    storage.clear_cache()
    assert r.exit_code == 2, r.output
    assert "s3://some-bucket/run" in r.output and "credentials were refused" in r.output
    assert "AWS_ACCESS_KEY_ID" in r.output and started == []


def test_judge_reads_and_writes_on_s3_and_skips_a_finished_run(s3_bucket: str):
    """The judge stage with its input and run directory in the bucket (a custom judge, so no
    model is needed): judgements, results and the marker land there; a rerun with the same
    config reads its stats back from the bucket without judging again."""
    from craft_ray.stages.judge.config import JudgeConfig, JudgeStageConfig
    from craft_ray.stages.judge.stage import run_judge

    preds = f"{s3_bucket}/eval/preds.jsonl"
    storage.write_text(preds, "".join(json.dumps({
        "instruction": f"Summarise text {i}.", "reference": f"reference {i}",
        "prediction": f"summary {i}"}) + "\n" for i in range(10)))
    cfg = JudgeStageConfig(run_dir=f"{s3_bucket}/run", judge=JudgeConfig(
        input_path=preds, name="m", judge={"model": "unused"}))
    calls: list[int] = []

    def judge(prompts: list[str]) -> list[str]:
        calls.append(len(prompts))
        return ["Output (2)"] * len(prompts)

    stats = run_judge(cfg, generate=judge)
    out = f"{s3_bucket}/run/evaluate/judge/m"
    res = storage.read_json(f"{out}/results.json")
    assert res["n"] == 10 and res["eval_set"] == "preds"
    assert res["wins"] == 10 - res["swapped"] and stats["win_rate"] == res["win_rate"]
    assert len(storage.read_text(f"{out}/judgements.jsonl").splitlines()) == 10
    assert storage.is_file(f"{out}/_SUCCESS") and stats["outputs"] == out
    assert run_judge(cfg, generate=judge) == stats and calls == [10]  # skipped: no new call
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_judge(cfg.model_copy(update={"judge": cfg.judge.model_copy(
            update={"input_path": f"{s3_bucket}/eval/missing.jsonl", "name": "x"})}))


def test_multihop_strategy_with_run_dir_on_s3(ray_local, s3_bucket: str, tiny_causal_lm: Path,
                                             tmp_path: Path):
    """A seed strategy other than craft (multihop: it reads the embedding store too) with the
    run directory in the bucket: retrieve's samples and the store are read from there, the
    step files, clean/rejects and the marker written there, every pair accounted for."""
    from tests.stages.generate.test_strategies_e2e import _run, _setup

    _setup(tmp_path)
    run = f"{s3_bucket}/run"
    for part in ("retrieve", "embed"):
        storage.upload(tmp_path / part, f"{run}/{part}")
    stats = _run(run, tiny_causal_lm, "multihop", min_similarity=0.5, max_similarity=0.999,
                 unanswerable_fraction=0.5, paragraph_max_chars=300,
                 long_answer_temperature=0.7)
    out = f"{run}/generate"
    assert storage.is_file(f"{out}/_SUCCESS") and stats["output_dir"] == out
    clean = storage.read_table(f"{out}/clean.parquet").to_pylist()
    rejects = storage.read_table(f"{out}/rejects.parquet").to_pylist()
    assert stats["pairs"] == 3 == len(clean) + len(rejects) == stats["rows_in"]
    assert len(storage.read_text(f"{out}/clean.jsonl").splitlines()) == len(clean)
    assert f"{out}/steps/multihop_decompose.parquet" in storage.list_files(f"{out}/steps")
    assert not (tmp_path / "generate").exists()  # nothing written beside the local inputs


def test_train_retriever_with_data_and_model_on_s3(s3_bucket: str, tmp_path: Path,
                                                   monkeypatch):
    """`craft-ray train-retriever` with its training data, eval set and output model in the
    bucket: the model, metrics, stats and marker are uploaded there; Ray Train's checkpoints
    and rank 0's metrics.jsonl are written there by the workers (OUT.work/ray), and the
    evaluation's embedding store (OUT.work/eval-trained); the work folder is local scratch;
    the held-out evaluation loads the uploaded model by its URI; a rerun skips from the
    bucket's marker."""
    beir = BEIR_DIR
    texts = [json.loads(x)["text"] for x in (beir / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(x)["text"] for x in (beir / "queries.jsonl").read_text()
               .splitlines()]
    data = f"{s3_bucket}/retriever/train.jsonl"
    storage.write_text(data, "".join(json.dumps({"query": q, "pos": [texts[i]],
                                                 "neg": [texts[i + 40]]}) + "\n"
                                     for i, q in enumerate(queries[:8])))
    storage.upload(beir, f"{s3_bucket}/beir/coffee")
    out = f"{s3_bucket}/retriever/model"
    monkeypatch.setenv("CRAFT_RAY_STORAGE_CACHE", str(tmp_path / "cache"))
    args = ["train-retriever", "--data", data, "--out", out, "--json", *[
        a for s in ["batch_size=4", "epochs=1", "max_seq_length=32", "negatives.per_query=1",
                    f"eval_data={s3_bucket}/beir/coffee", "eval_before=false",
                    "ray.num_cpus=2"] for a in ("--set", s)]]
    proc = _cli(args)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-6000:]
    for name in ("_SUCCESS", "modules.json", "model.safetensors", "stats.json"):
        assert storage.is_file(f"{out}/{name}"), name
    metrics = storage.read_json(f"{out}/metrics.json")
    assert metrics["finished"] and metrics["steps"] == 2 and metrics["after"]["ndcg@10"] > 0

    files = storage.list_files(f"{out}.work/ray", recursive=True)
    logs = [f for f in files if f.endswith("/metrics.jsonl")]
    assert len(logs) == 1 and logs[0].startswith(f"{out}.work/ray/retriever-"), files
    rows = [json.loads(x) for x in storage.read_text(logs[0]).splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # 8 queries / batch 4, one line per step
    assert any(f.endswith("/train_state.json") for f in files), files  # the checkpoints
    (work,) = (tmp_path / "cache" / "train-retriever").iterdir()  # local scratch
    assert (work / "metrics.jsonl").read_text() == storage.read_text(logs[0])
    # the held-out evaluation's corpus and embedding store: in the bucket, readable from any
    # node (not in the driver's scratch)
    assert read_info(f"{out}.work/eval-trained/embed/store").num_rows == 120
    assert storage.is_file(f"{out}.work/eval-trained/corpus/corpus.jsonl")
    assert not list(work.glob("eval-*"))

    proc = _cli(args)  # the same config again: skipped, stats read back from the bucket
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-6000:]
    assert json.loads(log.strip().splitlines()[-1])["skipped"] is True


@pytest.mark.slow
def test_eval_retrieval_and_mine_negatives_on_s3(ray_local, s3_bucket: str, tmp_path: Path,
                                                 monkeypatch):
    """`eval-retrieval` and `mine-negatives` with the BEIR folder, the work folder and the
    output in the bucket, as a user types them: the converted corpus and the embedding store
    are written to the bucket (the embedding actors read and write there, not on the driver's
    disk), the metrics and the negatives equal those of a local run, and mine-negatives on the
    same work folder reuses the bucket's store instead of embedding again."""
    from craft_ray.retrieval.evaluation import RetrievalEvalConfig, run_eval_retrieval
    from craft_ray.retrieval.negatives import MineNegativesConfig, run_mine_negatives

    local_metrics = run_eval_retrieval(RetrievalEvalConfig(
        data=str(BEIR_DIR), run_dir=str(tmp_path / "eval")))["metrics"]
    run_mine_negatives(MineNegativesConfig(data=str(BEIR_DIR), split="test",
                                           out=str(tmp_path / "neg.jsonl"),
                                           run_dir=str(tmp_path / "eval"), num_negatives=5))

    storage.upload(BEIR_DIR, f"{s3_bucket}/beir/coffee")
    work = f"{s3_bucket}/work/coffee"
    monkeypatch.setenv("CRAFT_RAY_STORAGE_CACHE", str(tmp_path / "cache"))
    proc = _cli(["eval-retrieval", "--data", f"{s3_bucket}/beir/coffee", "--run-dir", work,
                 "--out", f"{s3_bucket}/results/coffee.json", "--set", "ray.num_cpus=2"])
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-6000:]
    assert storage.read_json(f"{s3_bucket}/results/coffee.json")["metrics"] == local_metrics
    assert json.loads(log.strip().splitlines()[-1]) == local_metrics
    assert read_info(f"{work}/embed/store").num_rows == 120
    assert storage.is_file(f"{work}/corpus/corpus.jsonl")
    assert storage.list_files(f"{work}/embed/store/data", ".parquet", recursive=True)

    proc = _cli(["mine-negatives", "--data", f"{s3_bucket}/beir/coffee", "--split", "test",
                 "--out", f"{s3_bucket}/negatives/coffee.jsonl", "--set", f"run_dir={work}",
                 "--set", "num_negatives=5", "--set", "ray.num_cpus=2"])
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-6000:]
    assert "embed: already complete" in log  # the bucket's store, same corpus and config
    mined = storage.read_text(f"{s3_bucket}/negatives/coffee.jsonl")
    assert mined == (tmp_path / "neg.jsonl").read_text()
    rows = [json.loads(x) for x in mined.splitlines()]
    assert len(rows) == 40 and all(len(r["neg"]) == 5 for r in rows)
    assert not (ROOT / "runs" / "mine-negatives" / "coffee").exists()  # nothing local
