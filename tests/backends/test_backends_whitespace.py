"""Guided JSON without free whitespace (hf: xgrammar any_whitespace; vllm: disable_any_whitespace)
and hf sampling with top_k off."""

from __future__ import annotations

import json

import pyarrow as pa

from craft_ray.backends.vllm import VLLMBackendConfig, processor_config, sampling_params
from craft_ray.stages.filter.quality import (
    judge_criteria,
    judge_schema,
    parse_judge_scores,
    quality_judge_prompt,
)

SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": 0, "guided": True}


def _judge_rows(tok, n: int) -> pa.Table:
    schema = json.dumps(judge_schema(judge_criteria(True)))
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": quality_judge_prompt(
            "medqa", f"Question {i} about grinding coffee?\nA. fine\nB. coarse\nAnswer: A",
            "Grind the beans fine for espresso. " * 10, True)}]
        p = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        rows.append({"sample_id": f"s{i}", "prompt": p,
                     "prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"],
                     "schema": schema, "max_new_tokens": 64})
    return pa.Table.from_pylist(rows)


def test_hf_compact_json_closes_where_free_whitespace_loops(tiny_causal_lm):
    from transformers import AutoTokenizer

    from craft_ray.backends.hf import HFGenerator

    batch = _judge_rows(AutoTokenizer.from_pretrained(tiny_causal_lm), 3)
    crit = judge_criteria(True)
    cfg = {"generate_batch_size": 3, "torch_threads": 1}
    # xgrammar's default grammar lets the untrained model emit whitespace to max tokens ...
    loose = HFGenerator(str(tiny_causal_lm), None, {**cfg, "guided_any_whitespace": True},
                        SAMPLING)(batch).to_pylist()
    assert all(r["finish_reason"] == "length" for r in loose)
    assert all(parse_judge_scores(r["text"], crit) is None for r in loose)
    # ... the default (compact) grammar has no whitespace to loop on: the JSON closes
    out = HFGenerator(str(tiny_causal_lm), None, cfg, SAMPLING)(batch).to_pylist()
    for r in out:
        assert r["finish_reason"] == "stop" and r["error"] == "", r
        assert r["text"] == json.dumps(json.loads(r["text"]))  # json.dumps layout exactly
        assert parse_judge_scores(r["text"], crit) is not None


def test_hf_sampling_with_top_k_off(tiny_causal_lm):
    """top_k=-1 ("off", as in vLLM) must not reach transformers, which rejects k <= 0."""
    from transformers import AutoTokenizer

    from craft_ray.backends.hf import HFGenerator

    batch = _judge_rows(AutoTokenizer.from_pretrained(tiny_causal_lm), 2)
    out = HFGenerator(str(tiny_causal_lm), None, {"torch_threads": 1},
                      {**SAMPLING, "temperature": 1.0})(batch).to_pylist()
    assert all(r["error"] == "" and r["finish_reason"] == "stop" for r in out), out


def test_vllm_disables_free_whitespace_in_engine_and_requests():
    row = {"sample_id": "a", "schema": '{"type": "object"}', "max_new_tokens": 8}
    pc = processor_config(VLLMBackendConfig(), "m")
    assert pc.engine_kwargs["structured_outputs_config"] == {"disable_any_whitespace": True}
    # the user's own structured outputs settings are kept (and win on conflicts)
    pc = processor_config(VLLMBackendConfig(engine_kwargs={
        "structured_outputs_config": {"backend": "guidance"}}), "m")
    assert pc.engine_kwargs["structured_outputs_config"] == {
        "disable_any_whitespace": True, "backend": "guidance"}
    loose = VLLMBackendConfig(guided_any_whitespace=True)
    assert "structured_outputs_config" not in processor_config(loose, "m").engine_kwargs
    sp = sampling_params(row, {**SAMPLING, "any_whitespace": False})
    assert sp["structured_outputs"] == {"json": row["schema"], "disable_any_whitespace": True}
    assert sampling_params(row, {**SAMPLING, "any_whitespace": True})[
        "structured_outputs"]["disable_any_whitespace"] is False
