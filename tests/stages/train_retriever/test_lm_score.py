"""LM scoring (LLM-Embedder's p(answer | query, key)) with the tiny random-init causal LM."""

from __future__ import annotations

import pytest

from craft_ray.stages.train_retriever.config import LMScoringSettings
from craft_ray.stages.train_retriever.data import Example
from craft_ray.stages.train_retriever.lm_score import answer_logprobs, score_examples


def test_answer_logprobs_is_the_mean_token_loglik_of_the_answer(tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_lm))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
    prompts = ["Knowledge: espresso is fine\n\nAnswer: ", "short"]
    answers = ["fine grind", "a much longer answer here"]
    got = answer_logprobs(model, tok, prompts, answers, max_length=256, batch_size=2)
    for p, a, g in zip(prompts, answers, got):  # one at a time, no padding
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        p_ids = bos + tok(p, add_special_tokens=False)["input_ids"]
        a_ids = tok(a, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want = sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(a_ids)) / len(a_ids)
        assert g == pytest.approx(want, rel=1e-4, abs=1e-4)
    # a prompt over max_length is cut from the left; the answer is scored whole
    long = answer_logprobs(model, tok, ["word " * 400], ["fine grind"], max_length=64)
    assert len(long) == 1 and long[0] < 0


def test_score_examples_on_ray_gives_teacher_scores_to_rows_with_answers(ray_local, tiny_lm):
    exs = [Example("q1", ["p1", "p2"], ["n1", "n2", "n3"], answers=["a1"]),
           Example("q2", ["p"], ["n"]),  # no answers: not scored
           Example("q3", ["p"], ["n"], teacher_scores=[0.0, -1.0], answers=["a"])]  # given
    cfg = LMScoringSettings(enabled=True, model=str(tiny_lm), max_candidates=3,
                            rows_per_call=2)
    assert score_examples(exs, cfg) == 1
    a, b, c = exs
    assert len(a.teacher_scores) == 3 and all(s < 0 for s in a.teacher_scores)
    assert (a.pos, a.neg) == (["p1", "p2"], ["n1"])  # keys past max_candidates dropped
    assert b.teacher_scores is None and c.teacher_scores == [0.0, -1.0]
