"""``craft-ray bench train``, tiny: the three sides run interleaved and report tokens/s."""

from __future__ import annotations

import json
from pathlib import Path

from craft_ray.bench.train import run_bench_train

FEWSHOTS = Path(__file__).resolve().parents[2] / "data" / "fewshots" / "bioqa.jsonl"


def test_bench_train_small(ray_local) -> None:
    r = run_bench_train(rows=8, steps=2, repeats=1, fewshots=FEWSHOTS, hidden_size=32,
                        warmup=False)
    for side in ("a_plain_tokens_per_s", "b_ray_1worker_tokens_per_s",
                 "c_ray_2workers_tokens_per_s"):
        assert len(r[side]["runs"]) == 1 and r[side]["median"] > 0, side
    assert r["ratio"] == r["ratio_b_over_a"]["median"] > 0
    assert r["ratio_c_over_a"]["median"] > 0 and r["repeats"] == 1
    assert r["ray_1worker_wall_s"]["median"] > 0 and "quiet" in r
    json.dumps(r)
