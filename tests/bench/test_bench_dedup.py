"""``craft-ray bench dedup`` on a small planted corpus: every side runs interleaved, and both
methods find the planted duplicates."""

from __future__ import annotations

import json
from pathlib import Path

from craft_ray.bench.dedup import run_bench_dedup

DATA = Path(__file__).resolve().parents[2] / "data" / "stackexchange"


def test_bench_dedup_small() -> None:
    r = run_bench_dedup(DATA, n=400, baseline_n=120, ray_path=False, repeats=2)
    for side in ("ours_seconds_n", "ours_seconds_4n", "ours_seconds_subset",
                 "baseline_seconds_subset"):
        assert len(r[side]["runs"]) == 2 and r[side]["median"] > 0, side
    assert r["ratio"] > 0 and len(r["speedup_at_n_extrapolated"]["runs"]) == 2
    assert r["planted_near"] > 0 and r["subset_planted_near"] > 0
    # planted copies are found by both (not a speed claim: a check that they ran on the data)
    assert r["ours_at_n"]["recall_exact"] == 1.0
    assert r["baseline_subset"]["recall_near"] > 0.5 and r["ours_subset"]["recall_near"] > 0.5
    assert "quiet" in r and "load_before" in r
    json.dumps(r)
