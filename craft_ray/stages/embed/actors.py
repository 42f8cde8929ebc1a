"""Ray actors of the embed stage: the embedder, loaded once per actor."""

from __future__ import annotations

import numpy as np

from craft_ray.models.embedder import encode_texts, load_sentence_transformer


class Embedder:
    """Ray Data actor: loads the model once, embeds batches of documents."""

    def __init__(self, model: str, max_seq_length: int | None, fp16: bool,
                 encode_batch_size: int, torch_threads: int | None,
                 trust_remote_code: bool = False) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = load_sentence_transformer(model, None, max_seq_length, fp16,
                                               trust_remote_code)
        self.encode_batch_size = encode_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vec = encode_texts(self.model, [str(t) for t in batch["text"]], self.encode_batch_size)
        out = {k: batch[k] for k in ("doc_id", "corpus", "shard", "row", "text_len")}
        out["embedding"] = vec
        return out
