"""Fault tolerance with real processes: an embedding actor killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from craft_ray.stages.embed.stage import run_embed
from tests.stages.embed.test_embed import make_c4_corpus, stage_cfg, store_rows


def _actor_pids() -> list[int]:
    """Embedding actor processes of *this* session's Ray (children of its raylet), so a test
    never touches another Ray on the same machine."""
    import ray

    node = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    out = subprocess.run(["pgrep", "-P", str(raylet), "-f", r"MapBatches\(Embedder\)"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_killed_embedding_actor_every_document_once(ray_local, tmp_path: Path):
    corpus = make_c4_corpus(tmp_path / "c4", shards=4, docs=40, bad=False)
    # Small batches so the run is still going when the actor dies.
    cfg = stage_cfg(tmp_path / "run", corpus, batch_size=8, encode_batch_size=8,
                    shards_per_wave=4, export_h5=False)
    parts = tmp_path / "run" / "embed" / "store" / "_parts"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            pids = _actor_pids()
            if pids and parts.is_dir() and any(parts.rglob("*.parquet")):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    stats = run_embed(cfg)
    t.join(timeout=5)
    assert killed, "no embedding actor was killed while the stage ran"
    assert stats["rows_out"] == 160
    rows = store_rows(tmp_path / "run" / "embed" / "store")  # asserts no id is stored twice
    expected = {f"c4/c4-train.{s:05d}-of-00004.json.gz#{d}" for s in range(4) for d in range(40)}
    assert set(rows) == expected
