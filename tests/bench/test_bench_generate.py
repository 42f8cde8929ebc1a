"""``craft-ray bench generate`` end to end, tiny: the random tiny LM, 4 prompts of 8 new
tokens, one interleaved round; both sides produce tokens, guided and unguided, and the result
has the structure the README quotes."""

from __future__ import annotations

import json

from craft_ray.bench.generate import run_bench_generate


def test_bench_generate_tiny(ray_local, tiny_causal_lm) -> None:
    r = run_bench_generate(model=str(tiny_causal_lm), prompts=4, max_new_tokens=8,
                           batch_size=2, repeats=1, max_prompt_tokens=1500)
    assert r["prompts"] == 4 and r["repeats"] == 1 and r["modes"] == ["guided", "unguided"]
    for m in ("guided", "unguided"):
        x = r[m]
        for side in ("plain_tokens_per_s", "stage_tokens_per_s", "stage_wall_tokens_per_s"):
            assert len(x[side]["runs"]) == 1 and x[side]["median"] > 0, (m, side)
        assert x["ratio"] > 0 and x["ratio_wall"] > 0
        assert x["ratio_summary"]["min"] <= x["ratio"] <= x["ratio_summary"]["max"]
        # both sides generated: at least one token per prompt, at most max_new_tokens each
        for side in ("plain_tokens", "stage_tokens"):
            assert len(x[side]) == 1 and 4 <= x[side][0] <= 4 * 8, (m, side, x[side])
        t = x["stage_time"]
        assert 0 < t["model_s"]["median"] <= t["generation_s"]["median"] <= t["wall_s"]["median"]
        for o, g, x in zip(t["overhead_s"]["runs"], t["generation_s"]["runs"],
                           t["model_s"]["runs"]):
            assert abs(o - (g - x)) <= 0.002, (o, g, x)
    assert r["stage_actor"]["torch_threads"] >= 1
    assert r["threads_plain"]["torch_threads"] == r["stage_actor"]["torch_threads"]
    assert "quiet" in r and "load_before" in r
    json.dumps(r)  # the CLI prints it as its last line
