"""The ONNX Runtime embedder backend (float32 and dynamic int8) against plain
sentence-transformers, and the config rules around it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from craft_ray.config import ConfigError, validate  # noqa: E402
from craft_ray.models.embedder import export_onnx, load_sentence_transformer  # noqa: E402
from craft_ray.stages.embed import EmbedStageConfig  # noqa: E402

TEXTS = [
    "How do I descale an espresso machine without vinegar?",
    "Ales ferment best between 16 and 20 degrees Celsius; lagers want it colder.",
    "What grind size works for a French press?",
    "Dry hopping adds aroma without adding bitterness.",
    "word " * 400,  # longer than max_seq_length: truncated the same way on both sides
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def test_onnx_float32_equals_torch_and_int8_stays_close(cache: Path) -> None:
    ref = load_sentence_transformer("all-MiniLM-L6-v2", "cpu", 128, False).encode(
        TEXTS, normalize_embeddings=True)
    fp32 = load_sentence_transformer("all-MiniLM-L6-v2", None, 128, False, backend="onnx",
                                     cache_dir=cache, threads=1)
    v32 = fp32.encode(TEXTS, normalize_embeddings=True)
    assert v32.shape == ref.shape == (len(TEXTS), 384)
    assert float(np.max(1 - np.sum(ref * v32, axis=1))) < 1e-5
    # the swapped module really is the ONNX session, not the torch model
    assert type(fp32[0].model).__name__ == "OnnxTransformer"
    int8 = load_sentence_transformer("all-MiniLM-L6-v2", None, 128, False, backend="onnx",
                                     quantize="int8", cache_dir=cache, threads=1)
    v8 = int8.encode(TEXTS, normalize_embeddings=True)
    dist = 1 - np.sum(ref * v8, axis=1)
    assert 1e-6 < float(np.max(dist)) < 0.05  # quantised (not identical), still close
    # similarities between texts move little (ranking quality: see the nDCG test)
    assert float(np.max(np.abs(ref @ ref.T - v8 @ v8.T))) < 0.05


def test_export_is_made_once_and_reused(cache: Path) -> None:
    first = export_onnx("all-MiniLM-L6-v2", cache)
    stamp = (first / "model_int8.onnx").stat().st_mtime_ns
    again = export_onnx("all-MiniLM-L6-v2", cache)
    assert again == first and (again / "model_int8.onnx").stat().st_mtime_ns == stamp
    # MatMul weights int8 (a quarter of their float32 bytes); the embedding table stays float32
    assert (first / "model_int8.onnx").stat().st_size < 0.75 * (first / "model.onnx").stat().st_size
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no tmp left


def test_config_rules() -> None:
    corpora = [{"name": "c", "format": "jsonl", "paths": ["x.jsonl"]}]
    ok = validate(EmbedStageConfig, {"embed": {"corpora": corpora, "backend": "onnx",
                                               "quantize": "int8"}}, "t")
    assert ok.embed.backend == "onnx" and ok.embed.quantize == "int8"
    with pytest.raises(ConfigError, match="quantize=int8 needs embed.backend=onnx"):
        validate(EmbedStageConfig, {"embed": {"corpora": corpora, "quantize": "int8"}}, "t")
    with pytest.raises(ConfigError, match="runs on CPU"):
        validate(EmbedStageConfig, {"embed": {"corpora": corpora, "backend": "onnx",
                                              "num_gpus": 1}}, "t")
    with pytest.raises(ConfigError, match="backend"):
        validate(EmbedStageConfig, {"embed": {"corpora": corpora, "backend": "tensorrt"}}, "t")
    with pytest.raises(ValueError, match="needs embed.backend=onnx"):
        load_sentence_transformer("all-MiniLM-L6-v2", "cpu", quantize="int8")


def test_onnx_encoder_needs_neither_torch_nor_sentence_transformers(cache: Path) -> None:
    """An embedding actor of the onnx backend loads tokenizer + session + pooling only: in a
    fresh process neither torch nor sentence-transformers is imported, and its vectors and
    token counts are sentence-transformers' around the same session."""
    import subprocess
    import sys

    export_onnx("all-MiniLM-L6-v2", cache)  # the stage's driver exports once
    code = (
        "import sys, json, numpy as np\n"
        "from craft_ray.models.embedder import load_embedder, encode_texts\n"
        f"m = load_embedder('all-MiniLM-L6-v2', None, 128, False, backend='onnx', "
        f"quantize='int8', cache_dir={str(cache)!r}, threads=1)\n"
        f"v = encode_texts(m, {TEXTS!r}, 2)\n"
        "print(json.dumps({'cls': type(m).__name__, 'torch': 'torch' in sys.modules,\n"
        "  'st': 'sentence_transformers' in sys.modules, 'v': v.astype(float).tolist()}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {**got, "cls": "OnnxEncoder", "torch": False, "st": False}
    from craft_ray.models.embedder import encode_texts, token_counts

    st = load_sentence_transformer("all-MiniLM-L6-v2", None, 128, False, backend="onnx",
                                   quantize="int8", cache_dir=cache, threads=1)
    ref = encode_texts(st, TEXTS, 2).astype(np.float32)
    v = np.array(got["v"], dtype=np.float32)
    assert v.shape == ref.shape
    assert float(np.max(np.abs(v - ref))) < 1e-3  # float16 storage: a unit or two of rounding
    from craft_ray.models.embedder import load_embedder

    light = load_embedder("all-MiniLM-L6-v2", None, 128, False, backend="onnx",
                          cache_dir=cache, threads=1)
    counts = token_counts(light, TEXTS)
    assert counts.tolist() == token_counts(st, TEXTS).tolist()
    assert counts[-1] == 128  # truncated at max_seq_length, special tokens in


def test_onnx_encoder_falls_back_for_other_layouts(cache: Path, tmp_path: Path) -> None:
    """A model whose modules are not Transformer -> Pooling(mean|cls) -> Normalize (here max
    pooling) keeps the sentence-transformers path."""
    import json
    import shutil

    from craft_ray.models.embedder import load_embedder, resolve_model

    model = tmp_path / "maxpool"
    shutil.copytree(resolve_model("all-MiniLM-L6-v2"), model)
    pool = json.loads((model / "1_Pooling" / "config.json").read_text())
    pool.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (model / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    m = load_embedder(str(model), None, 128, False, backend="onnx", cache_dir=cache, threads=1)
    assert type(m).__name__ == "SentenceTransformer"
    assert type(m[0].model).__name__ == "OnnxTransformer"
