"""The hf backend's token counter: new tokens of unfinished rows, reported as they come."""

from __future__ import annotations

import torch

from craft_ray.backends import hf


def test_counts_new_tokens_without_padding_and_flushes(monkeypatch):
    sent: list[dict] = []
    monkeypatch.setattr(hf, "report_progress", lambda **kw: sent.append(kw))
    c = hf.TokenCounter(pad_token_id=0, every_s=3600)
    c.put(torch.tensor([[5, 6, 7], [8, 9, 10]]))  # the prompt: not counted
    c.put(torch.tensor([11, 12]))
    c.put(torch.tensor([13, 0]))  # row 2 finished: padding
    assert sent == []  # held until every_s passed or generate() ends
    c.end()
    assert sent == [{"tokens": 3}]
    c.end()
    assert sent == [{"tokens": 3}]  # nothing new: nothing sent


def test_reports_every_interval(monkeypatch):
    sent: list[dict] = []
    monkeypatch.setattr(hf, "report_progress", lambda **kw: sent.append(kw))
    c = hf.TokenCounter(pad_token_id=None, every_s=0.0)
    c.put(torch.tensor([[1, 2]]))
    c.put(torch.tensor([3]))
    c.put(torch.tensor([4]))
    assert sent == [{"tokens": 1}, {"tokens": 1}]


def test_generate_with_the_counter_matches_generate_without(tiny_causal_lm, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(hf, "report_progress", lambda **kw: None)
    tok = AutoTokenizer.from_pretrained(tiny_causal_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm).eval()
    ids = tok(["hello there", "a longer prompt here"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    a = model.generate(**ids, **kw)
    b = model.generate(**ids, streamer=hf.TokenCounter(tok.pad_token_id), **kw)
    assert torch.equal(a, b)
