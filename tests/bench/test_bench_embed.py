"""``craft-ray bench embed`` end to end on a few real StackExchange posts: every side runs,
interleaved, and the result carries the figures the README quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craft_ray.bench.embed import run_bench_embed

DATA = Path(__file__).resolve().parents[2] / "data" / "stackexchange"


def test_bench_embed_small(ray_local) -> None:
    pytest.importorskip("onnxruntime")
    r = run_bench_embed(DATA, min_docs=0, max_docs=40, shards=2, repeats=2, int8=True)
    assert r["docs"] == 40 and r["repeats"] == 2
    for side in ("encode_s", "stage_s", "int8_stage_s", "int8_encode_s"):
        assert len(r[side]["runs"]) == 2 and r[side]["median"] > 0, side
    assert r["ratio"] > 0 and r["ratio_int8"] > 0 and r["ratio_int8_encode"] > 0
    assert r["max_cos_dist"] < 1e-3  # float16 store vs float32 encode: rounding only
    assert 0 < r["int8_max_cos_dist"] < 0.05  # int8: close, not identical
    assert r["stage_time"]["model_s"] > 0 and r["stage_time"]["wall_s"] > r["stage_time"]["model_s"]
    assert r["stage_config"]["backend"] == "torch"
    assert r["threads_encode"]["torch_threads"] >= 1 and "quiet" in r
    json.dumps(r)  # the CLI prints it as its last line


def test_where_time_goes_counts_model_time_per_actor() -> None:
    """The stage reports its actors' model time summed: with two actors in parallel it can
    exceed the wall time (a 2-actor bench gave other_s = -61.9 s before this)."""
    from craft_ray.bench.embed import _where_time_goes

    stats = {"seconds_wall": 81.15, "encode_seconds_this_run": 143.06}
    two = _where_time_goes(stats, 2)
    assert two["model_s"] == 71.53 and two["model_s_total"] == 143.06
    assert two["other_s"] == 9.62 and 0 < two["other_frac"] < 0.2
    from craft_ray.stages.embed.config import EmbedConfig
    from craft_ray.stages.embed.stage import max_actors

    auto = EmbedConfig(corpora=[{"name": "c", "format": "jsonl", "paths": ["x"]}],
                       concurrency=[1, 2])
    assert _where_time_goes(stats, max_actors(auto))["actors"] == 2
    assert _where_time_goes({"seconds_wall": 10.0, "encode_seconds_this_run": 9.0})["other_s"] == 1.0
