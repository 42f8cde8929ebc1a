"""A sentence-transformers model's ONNX export run without torch or sentence-transformers.

An embedding actor of the ``onnx`` backend used to load the model through
sentence-transformers and swap its transformer for the ONNX session: ~5.5 s of its start-up on
a 2-core CPU went to importing torch and sentence-transformers (which imports scikit-learn,
scipy and pandas), for a forward that ONNX Runtime runs anyway. :class:`OnnxEncoder` does
what sentence-transformers does around that forward for the common layout (``modules.json``:
Transformer, then Pooling with mean or CLS tokens, optionally Normalize) with the model's own
``tokenizer.json`` (Hugging Face ``tokenizers``, the library under the fast tokenizer), so an
actor starts in well under a second. Any other layout (a Dense layer, max pooling, a default
prompt, remote code) gets ``None`` from :func:`load_onnx_encoder`, and the caller keeps the
sentence-transformers path. Same tokens, same session, same pooling: the vectors agree with
sentence-transformers' to float32 rounding (a test).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"


class OnnxEncoder:
    """Tokenizer + ONNX session + pooling (+ normalisation) of one exported model."""

    def __init__(self, tokenizer: Any, session: Any, inputs: list[str], pooling: str,
                 normalize: bool, lowercase: bool, max_seq_length: int, dim: int) -> None:
        self.tokenizer, self.session, self.inputs = tokenizer, session, inputs  # tokenizer:
        self.pooling, self.normalize, self.lowercase = pooling, normalize, lowercase  # pads,
        self.max_seq_length, self.dim = max_seq_length, dim  # truncates at max_seq_length

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def _encodings(self, texts: list[str]) -> list[Any]:
        return self.tokenizer.encode_batch([t.lower() for t in texts] if self.lowercase
                                           else texts)

    def token_counts(self, texts: list[str]) -> np.ndarray:
        """Tokens of each text as the model sees it (special tokens in, truncated): the
        padded encodings' attention masks."""
        return np.fromiter((sum(e.attention_mask) for e in self._encodings(texts)),
                           dtype=np.int64, count=len(texts))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Float32 embeddings of one batch (padded to its longest text), pooled as the model's
        Pooling module says, L2-normalised when the model has a Normalize module."""
        enc = self._encodings(texts)
        feeds = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
        hidden = self.session.run(None, {n: feeds[n] for n in self.inputs})[0]
        mask = feeds["attention_mask"].astype(np.float32)[:, :, None]
        if self.pooling == "cls":
            vec = hidden[:, 0]
        else:  # sentence-transformers: sum over the mask / clamp(count, 1e-9)
            vec = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        vec = vec.astype(np.float32)
        if self.normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
            vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        return vec


def _layout(model_dir: Path) -> tuple[str, bool] | None:
    """(pooling, normalize) when the model is Transformer -> Pooling(mean|cls) [-> Normalize]
    with no default prompt; None otherwise."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        types = [m["type"] for m in sorted(modules, key=lambda m: m["idx"])]
        if types not in ([_TRANSFORMER, _POOLING], [_TRANSFORMER, _POOLING, _NORMALIZE]) \
                or modules[0].get("path", "") not in ("", "."):
            return None
        pool = json.loads((model_dir / modules[1]["path"] / "config.json").read_text())
        st_cfg = model_dir / "config_sentence_transformers.json"
        if st_cfg.is_file() and json.loads(st_cfg.read_text()).get("default_prompt_name"):
            return None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    modes = {k for k, v in pool.items() if k.startswith("pooling_mode_") and v}
    if modes == {"pooling_mode_mean_tokens"}:
        return "mean", len(types) == 3
    if modes == {"pooling_mode_cls_token"}:
        return "cls", len(types) == 3
    return None


def load_onnx_encoder(model_dir: str | Path, export_dir: Path, quantize: str,
                      max_seq_length: int | None, threads: int | None) -> OnnxEncoder | None:
    """An :class:`OnnxEncoder` over ``export_dir``'s export of the model in ``model_dir``
    (a local folder), or None when the model's layout needs sentence-transformers itself."""
    model_dir = Path(model_dir)
    layout = _layout(model_dir)
    if layout is None or not (model_dir / "tokenizer.json").is_file():
        return None
    import onnxruntime as ort
    from tokenizers import Tokenizer

    bert_cfg_file = model_dir / "sentence_bert_config.json"
    bert_cfg = json.loads(bert_cfg_file.read_text()) if bert_cfg_file.is_file() else {}
    hf_cfg = json.loads((model_dir / "config.json").read_text())
    limit = max_seq_length or bert_cfg.get("max_seq_length") or 512
    limit = min(limit, int(hf_cfg.get("max_position_embeddings", limit)))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=limit)  # longest_first, as sentence-transformers asks
    pad_token = "[PAD]"
    tcfg_file = model_dir / "tokenizer_config.json"
    if tcfg_file.is_file():
        pad = json.loads(tcfg_file.read_text()).get("pad_token")
        pad_token = pad.get("content") if isinstance(pad, dict) else (pad or pad_token)
    pad_id = tok.token_to_id(pad_token)
    if pad_id is None:
        return None
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)  # to the batch's longest text
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    onnx_file = export_dir / ("model_int8.onnx" if quantize == "int8" else "model.onnx")
    session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    if not set(inputs) <= {"input_ids", "attention_mask", "token_type_ids"}:
        return None
    return OnnxEncoder(tok, session, inputs, layout[0], layout[1],
                       bool(bert_cfg.get("do_lower_case")), limit, int(hf_cfg["hidden_size"]))
