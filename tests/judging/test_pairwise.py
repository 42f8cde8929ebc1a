"""Judge prompts, seeded order swap, verdict parsing, win rates both ways, ROUGE-L."""

from __future__ import annotations

import pytest

from craft_ray.judging.pairwise import (
    build_pairs,
    judge_outputs,
    judge_prompt,
    outcome,
    parse_verdict,
    rouge_l,
    win_rates,
)

INS = [f"Summarise text {i}." for i in range(200)]
REF = [f"reference summary {i}" for i in range(200)]
CAND = [f"MODEL summary {i}" for i in range(200)]


def test_pairs_are_swapped_at_random_under_a_seed():
    a = build_pairs(INS, REF, CAND, seed=1234)
    b = build_pairs(INS, REF, CAND, seed=1234)
    c = build_pairs(INS, REF, CAND, seed=7)
    assert [p.swapped for p in a] == [p.swapped for p in b]
    assert [p.swapped for p in a] != [p.swapped for p in c]
    assert 70 < sum(p.swapped for p in a) < 130
    for p in a:
        model_out = p.output_1 if p.swapped else p.output_2
        ref_out = p.output_2 if p.swapped else p.output_1
        assert model_out == CAND[p.index] and ref_out == REF[p.index]
    prompt = judge_prompt(a[0])
    assert a[0].output_1 in prompt and a[0].output_2 in prompt and INS[0] in prompt
    with pytest.raises(ValueError, match="lengths differ"):
        build_pairs(INS, REF[:3], CAND)


@pytest.mark.parametrize("text,verdict", [
    ("Output (1)", "1"), ("output (2)", "2"), ("**Output (2)** is better than Output (1)", "2"),
    ("Output [1]", "1"), ("Output 2", "2"), ("2", "2"), ("(1)", "1"), ("1.", "1"),
    ("Tie", "tie"), ("It's a tie.", "tie"), ("I cannot decide.", None), ("", None),
    (None, None), ("Both outputs are fine", None), ("Output (3)", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_outcome_and_win_rates_both_ways():
    assert outcome("2", swapped=False) == "win" and outcome("1", swapped=True) == "win"
    assert outcome("1", swapped=False) == "loss" and outcome("2", swapped=True) == "loss"
    assert outcome("tie", True) == "tie" and outcome(None, False) == "unparsable"
    r = win_rates(["win"] * 5 + ["loss"] * 3 + ["tie"] * 1 + ["unparsable"] * 1)
    assert (r["wins"], r["losses"], r["ties"], r["unparsable"], r["n"]) == (5, 3, 1, 1, 10)
    assert r["win_rate"] == 0.5  # CRAFT: ties and unparsable count as losses
    assert r["win_rate_decided"] == 5 / 8
    assert r["win_rate_ties_half"] == 5.5 / 9
    assert win_rates([])["win_rate"] == 0.0


def test_rouge_l():
    r = rouge_l(["the cat sat on the mat", "abc", "same text"],
                ["a cat sat on a mat", "xyz", "same text"])
    assert r["per_item"][0] == pytest.approx(2 / 3)
    assert r["per_item"][1] == 0.0 and r["per_item"][2] == 1.0
    assert r["rougeL_f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)


def test_judge_outputs_with_content_and_position_biased_judges():
    def prefers_model(prompts):  # recognises the model's output wherever it is placed
        return ["Output (1)" if "## Output (1)\nMODEL" in p else "Output (2)" for p in prompts]

    summary, rows = judge_outputs(INS, REF, CAND, prefers_model, seed=3)
    assert summary["win_rate"] == 1.0 and summary["wins"] == 200
    assert all(r["outcome"] == "win" for r in rows)

    def always_first(prompts):  # a position-biased judge wins exactly the swapped items
        return ["Output (1)"] * len(prompts)

    summary, rows = judge_outputs(INS, REF, CAND, always_first, seed=3)
    assert summary["wins"] == summary["swapped"] == sum(r["swapped"] for r in rows)
    assert 0.35 < summary["win_rate"] < 0.65

    def rambling(prompts):
        return ["Tie" if i % 4 == 0 else "no idea" for i in range(len(prompts))]

    summary, _ = judge_outputs(INS, REF, CAND, rambling)
    assert summary["ties"] == 50 and summary["unparsable"] == 150
    assert summary["win_rate"] == 0.0 and summary["win_rate_decided"] == 0.0
    assert 0 < summary["rougeL_f1"] < 1


def test_failed_judge_replies_carry_their_reason():
    from craft_ray.judging import JudgeReply, judge_outputs

    def gen(prompts):
        return [JudgeReply("Output (1)") if i % 2 else JudgeReply("", "Server error.", "HTTP 503")
                for i in range(len(prompts))]

    summary, rows = judge_outputs(["q"] * 4, ["ref"] * 4, ["cand"] * 4, gen, seed=0)
    assert summary["unparsable"] == 2 and summary["judge_errors"] == {"Server error.": 2}
    assert [r["judge_error"] for r in rows] == ["Server error.", "", "Server error.", ""]
    assert rows[0]["judge_error_detail"] == "HTTP 503" and rows[1]["verdict"] == "1"
    plain, prow = judge_outputs(["q"], ["ref"], ["cand"], lambda ps: [""] * len(ps), seed=0)
    assert plain["judge_errors"] == {} and prow[0]["judge_error"] == ""
