"""Embedding stage on a local Ray: store contents, rejects, stats, .h5 layout, resume after kill."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from craft_ray.config import ConfigError, load_config
from craft_ray.models.embedder import encode_texts, load_sentence_transformer
from craft_ray.stages.embed.config import EmbedStageConfig
from craft_ray.stages.embed.stage import run_embed
from craft_ray.store.vectors import read_info, read_shard_table, vectors_of

ROOT = Path(__file__).resolve().parents[3]
TOPICS = ["espresso extraction pressure", "storing whole coffee beans", "hop bitterness in IPA",
          "lager fermentation temperature", "cold brew ratio", "stout roasted barley"]


def make_c4_corpus(root: Path, shards: int, docs: int, bad: bool = True) -> Path:
    """A small C4-style corpus: `shards` json.gz files of `docs` lines (+ a few bad lines)."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines = []
        for d in range(docs):
            topic = TOPICS[(s + d) % len(TOPICS)]
            text = f"Document {s}-{d} about {topic}. " + " ".join(
                f"{topic} detail {k} of shard {s}." for k in range(8))
            lines.append(json.dumps({"text": text, "url": f"https://ex.org/{s}/{d}",
                                     "timestamp": "2019-01-01T00:00:00Z"}).encode())
        if bad:
            lines.insert(3, b'{"text": broken json')
            lines.insert(5, json.dumps({"text": "too short"}).encode())
        with gzip.open(root / f"c4-train.{s:05d}-of-{shards:05d}.json.gz", "wb") as fh:
            fh.write(b"\n".join(lines) + b"\n")
    return root


def stage_cfg(run_dir: Path, corpus: Path, **embed: object) -> EmbedStageConfig:
    data = {"run_dir": str(run_dir),
            "embed": {"corpora": [{"name": "c4", "format": "c4", "paths": [str(corpus)]}],
                      "max_seq_length": 64, "batch_size": 64, "encode_batch_size": 32,
                      **embed}}
    return EmbedStageConfig.model_validate(data)


def store_rows(store: Path) -> dict[str, tuple[int, np.ndarray]]:
    info = read_info(store)
    out = {}
    for sh in info.shards:
        t = read_shard_table(store, sh)
        for did, row, vec in zip(t.column("doc_id").to_pylist(), t.column("row").to_pylist(),
                                 vectors_of(t)):
            assert did not in out, f"doc id {did} stored twice"
            out[did] = (row, vec)
    return out


def test_embed_stage_store_rejects_stats_h5(ray_local, tmp_path: Path):
    corpus = make_c4_corpus(tmp_path / "c4", shards=3, docs=12)
    cfg = stage_cfg(tmp_path / "run", corpus)
    stats = run_embed(cfg)
    stage = tmp_path / "run" / "embed"
    store = stage / "store"

    assert stats["rows_in"] == 3 * 14 and stats["rows_out"] == 36
    assert stats["rejects"] == {"malformed_json": 3, "too_short": 3}
    assert (stage / "_SUCCESS").is_file() and (stage / "config.yaml").is_file()
    assert json.loads((stage / "stats.json").read_text())["rows_out"] == 36

    rows = store_rows(store)
    assert len(rows) == 36
    assert "c4/c4-train.00000-of-00003.json.gz#0" in rows
    # bad lines 3 and 5 of each shard are not in the store, their neighbours are
    assert "c4/c4-train.00001-of-00003.json.gz#3" not in rows
    assert "c4/c4-train.00001-of-00003.json.gz#4" in rows
    vecs = np.stack([v for _, v in rows.values()]).astype(np.float32)
    assert vecs.shape == (36, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)

    # Same vectors as a plain encode of the same texts.
    model = load_sentence_transformer("sentence-transformers/all-MiniLM-L6-v2", "cpu", 64)
    first = gzip.open(corpus / "c4-train.00000-of-00003.json.gz").read().decode().splitlines()
    text0 = json.loads(first[0])["text"]
    ref = encode_texts(model, [text0], 32)[0].astype(np.float32)
    got = rows["c4/c4-train.00000-of-00003.json.gz#0"][1].astype(np.float32)
    assert float(ref @ got) > 0.999

    rej = pq.read_table(stage / "rejects" / "c4" / "c4-train.00000-of-00003.json.gz.parquet")
    assert sorted(rej.column("reject_reason").to_pylist()) == ["malformed_json", "too_short"]
    assert '{"text": broken json' in rej.column("raw").to_pylist()

    with h5py.File(stage / "embeddings.h5") as f:
        ds = f["c4"]["c4-train.00002-of-00003.json.gz"]
        assert ds.shape == (12, 384) and ds.dtype == np.float16
        rows2 = f["_rows"]["c4"]["c4-train.00002-of-00003.json.gz"][:]
        assert list(rows2) == sorted(rows2) and 3 not in rows2 and 5 not in rows2
        # row i of the h5 dataset is the i-th document of the shard
        did = f"c4/c4-train.00002-of-00003.json.gz#{rows2[0]}"
        np.testing.assert_array_equal(ds[0], rows[did][1])

    # A rerun with the same config is skipped; a finished stage is not redone.
    mtime = (store / "store.json").stat().st_mtime
    assert run_embed(cfg)["rows_out"] == 36
    assert (store / "store.json").stat().st_mtime == mtime


def test_config_errors_before_ray(tmp_path: Path):
    corpora = [{"name": "x", "format": "c4", "paths": ["x"]}]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"embed": {"corpora": corpora, "batch_sise": 3}}))
    with pytest.raises(ConfigError, match=r"embed.batch_sise: unknown key"):
        load_config(EmbedStageConfig, p)
    p.write_text(yaml.safe_dump({"embed": {"corpora": corpora}}))
    with pytest.raises(ConfigError, match=r"embed.concurrency: Value error, concurrency \[min"):
        load_config(EmbedStageConfig, p, ["embed.concurrency=[3, 1]"])
    assert load_config(EmbedStageConfig, p, ["embed.concurrency=[1, 3]"]).embed.concurrency \
        == (1, 3)


def _cli(args: list[str], **kw: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    return subprocess.Popen([sys.executable, "-m", "craft_ray", *args], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_store(ray_local, tmp_path: Path):
    corpus = make_c4_corpus(tmp_path / "c4", shards=5, docs=10)
    embed = {"shards_per_wave": 1, "export_h5": False}
    # Reference: an uninterrupted run.
    run_embed(stage_cfg(tmp_path / "ref", corpus, **embed))
    ref = store_rows(tmp_path / "ref" / "embed" / "store")

    cfg_file = tmp_path / "kill.yaml"
    cfg_file.write_text(yaml.safe_dump(stage_cfg(tmp_path / "killed", corpus, **embed)
                                       .model_dump(mode="json")))
    data_dir = tmp_path / "killed" / "embed" / "store" / "data" / "c4"
    proc = _cli(["embed", "--config", str(cfg_file), "--set", "ray.num_cpus=2"])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if data_dir.is_dir() and any(data_dir.glob("*.parquet")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_at_kill = len(list(data_dir.glob("*.parquet")))
    assert 1 <= done_at_kill < 5, "the kill must land part-way"
    assert not (tmp_path / "killed" / "embed" / "_SUCCESS").exists()

    proc = _cli(["embed", "--config", str(cfg_file), "--set", "ray.num_cpus=2", "--json"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["shards_resumed"] >= done_at_kill and stats["rows_out"] == 50
    got = store_rows(tmp_path / "killed" / "embed" / "store")
    assert sorted(got) == sorted(ref)  # no id lost, none doubled
    for did, (row, vec) in ref.items():
        assert got[did][0] == row
        np.testing.assert_allclose(got[did][1].astype(np.float32), vec.astype(np.float32),
                                   atol=2e-3)


@pytest.mark.parametrize("concurrency", [1, 2, [1, 2]])
@pytest.mark.parametrize("num_shards", [2, 3, 8])
def test_readers_stay_apart_from_the_embedding_actors(ray_local, tmp_path: Path,
                                                      concurrency, num_shards):
    """Ray Data must not fuse the readers into the actor pool: fused, its input (the shards)
    is bundled by the embedder's batch_size, so a wave ran as one task on one actor. With two
    actors on this 2-CPU Ray both ask 0.5 CPU, which is when Ray Data fused them."""
    from ray.data._internal.logical.optimizers import get_execution_plan

    from craft_ray.stages.embed.stage import embed_dataset, pool_resources
    from craft_ray.store.corpus import Shard

    cfg = stage_cfg(tmp_path, tmp_path, concurrency=concurrency).embed
    if concurrency == 2:
        assert pool_resources(cfg)[0] == cfg.read_num_cpus  # the case that fused
    shards = [Shard(corpus="c4", path=str(tmp_path / f"{i}.json.gz"), shard=f"s{i}")
              for i in range(num_shards)]
    plan = get_execution_plan(embed_dataset(shards, cfg, tmp_path / "store", tmp_path)
                              ._logical_plan)
    op = plan[0].dag if isinstance(plan, tuple) else plan.dag
    names = []
    while op is not None:
        names.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    assert names == ["MapBatches(write_parts)", "MapBatches(Embedder)",
                     "MapBatches(read_shards)", "Input"]
