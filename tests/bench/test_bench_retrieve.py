"""``craft-ray bench retrieve`` on a small random store: it runs end to end, the stage agrees
with FAISS exactly, and it reports every figure the README quotes."""

from __future__ import annotations

import json
from pathlib import Path

from craft_ray.bench.retrieve import run_bench_retrieve


def test_bench_retrieve_small_store(ray_local, tmp_path: Path) -> None:
    r = run_bench_retrieve(tmp_path, rows=3000, dim=32, num_queries=4, k=50, shards=3,
                           concurrency=2, chunk_rows=700)
    assert r["recall"] == 1.0
    assert r["rows"] == 3000 and r["shards"] == 3 and r["actors"] == 2
    for key in ("stage_s", "ratio", "stage_fresh_s", "faiss_fresh_s", "ratio_fresh",
                "stage_cold_s", "peak_rss_mb"):
        assert isinstance(r[key], float) and r[key] > 0, key
    # FAISS searches 3,000 vectors in well under a millisecond (printed rounded)
    assert r["faiss_s"] >= 0 and r["stage_working_set_mb"] >= 0
    # the float32 vector cache the warm searches read (and FAISS loads) was written
    assert len(list((tmp_path / "store" / "_vector_cache").glob("*.f32.npy"))) == 3
    json.dumps(r)  # the CLI prints it as its last line
