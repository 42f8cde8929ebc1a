"""The embedder named by an object-store URI: downloaded where it is loaded, equal to the
local copy it was uploaded from."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_an_embedder_in_object_storage_loads_from_its_download(s3_bucket, tmp_path,
                                                               monkeypatch):
    from craft_ray.models.embedder import load_sentence_transformer, resolve_model
    from craft_ray.runtime import storage

    monkeypatch.setenv("CRAFT_RAY_STORAGE_CACHE", str(tmp_path / "cache"))
    bundled = resolve_model("all-MiniLM-L6-v2")
    uri = f"{s3_bucket}/models/minilm"
    storage.upload(bundled, uri)
    local = Path(resolve_model(uri))
    assert local.is_relative_to(tmp_path / "cache") and (local / "modules.json").is_file()
    texts = ["How fine should espresso be ground?", "Storing roasted beans"]
    got = load_sentence_transformer(uri, "cpu", 64, False).encode(texts)
    want = load_sentence_transformer(bundled, "cpu", 64, False).encode(texts)
    np.testing.assert_allclose(got, want, atol=1e-6)
