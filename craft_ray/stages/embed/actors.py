"""Ray actors of the embed stage: the embedder, loaded once per actor."""

from __future__ import annotations

import time

import numpy as np

from craft_ray.models.embedder import encode_texts, load_embedder


class Embedder:
    """Ray Data actor: loads the model once, embeds batches of documents."""

    def __init__(self, model: str, max_seq_length: int | None, fp16: bool,
                 encode_batch_size: int, torch_threads: int | None,
                 trust_remote_code: bool = False, backend: str = "torch",
                 quantize: str = "none", cache_dir: str | None = None) -> None:
        if torch_threads and backend == "torch":
            import torch

            torch.set_num_threads(torch_threads)
        self.model = load_embedder(model, None, max_seq_length, fp16, trust_remote_code,
                                   backend=backend, quantize=quantize, cache_dir=cache_dir,
                                   threads=torch_threads)
        self.encode_batch_size = encode_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        vec = encode_texts(self.model, [str(t) for t in batch["text"]], self.encode_batch_size)
        out = {k: batch[k] for k in ("doc_id", "corpus", "shard", "row", "text_len")}
        out["embedding"] = vec
        # the batch's model time, spread over its rows, so the stage can say where time went
        out["encode_s"] = np.full(len(vec), (time.perf_counter() - t0) / max(1, len(vec)))
        return out
