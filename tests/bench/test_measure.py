"""The noise-resistant timing shared by the bench commands: interleaving, paired ratios."""

from __future__ import annotations

import pytest

from craft_ray.bench.measure import conditions, interleave, paired_ratio, summary, thread_report


def test_interleave_alternates_after_warmup() -> None:
    calls: list[str] = []
    figures = {"a": iter([9.0, 1.0, 2.0, 3.0]), "b": iter([9.0, 2.0, 4.0, 9.0])}

    def side(name: str):
        def run() -> float:
            calls.append(name)
            return next(figures[name])
        return run

    out = interleave({"a": side("a"), "b": side("b")}, repeats=3)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up, then A B A B A B
    assert out == {"a": [1.0, 2.0, 3.0], "b": [2.0, 4.0, 9.0]}  # warm-up figures dropped
    r = paired_ratio(out["a"], out["b"])
    # pair by pair: 0.5, 0.5, 0.333 -> median 0.5 (not 6/15 of the sums)
    assert r["median"] == 0.5 and r["min"] == pytest.approx(0.333) and r["max"] == 0.5


def test_light_warmup_and_errors() -> None:
    seen: list[str] = []
    out = interleave({"a": lambda: seen.append("a") or 1.0},
                     repeats=2, warmup={"a": lambda: seen.append("warm")})
    assert seen == ["warm", "a", "a"] and out == {"a": [1.0, 1.0]}
    with pytest.raises(ValueError, match="repeats"):
        interleave({"a": lambda: 1.0}, repeats=0)
    with pytest.raises(ValueError, match="equal"):
        paired_ratio([1.0], [1.0, 2.0])


def test_summary_conditions_threads() -> None:
    s = summary([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["runs"]) == (2.0, 1.0, 3.0, [3.0, 1.0, 2.0])
    c = conditions([0.5, 0.4, 0.3])
    assert c["quiet"] is True and len(c["load_after"]) == 3
    assert conditions([3.0, 1.0, 1.0])["quiet"] is False
    t = thread_report()
    assert t["torch_threads"] >= 1 and t["cpu_count"] >= 1
