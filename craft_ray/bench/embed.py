"""``craft-ray bench embed``: plain sentence-transformers ``encode`` vs the embed stage.

Both embed the same real texts (every post of the StackExchange dumps, HTML stripped, at least
``min_docs`` of them) in one run. The baseline is one in-process ``model.encode`` call over all
texts (it sorts by length internally); its model load is not timed. The stage is timed from
the start of :func:`craft_ray.stages.embed.run_embed` to its end: reading, actor start-up and model
load, embedding, writing and finalising the store. Ray's own start is not timed (a cluster is
started once, not per stage).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.config import apply_overrides, validate
from craft_ray.models.embedder import encode_texts, load_sentence_transformer
from craft_ray.runtime import init_ray
from craft_ray.stages.embed import EmbedStageConfig, run_embed
from craft_ray.store.corpus import CorpusConfig, html_to_text, iter_posts, list_shards
from craft_ray.store.vectors import read_info, read_shard_table, vectors_of

logger = logging.getLogger(__name__)


def stackexchange_texts(root: Path, min_docs: int) -> list[str]:
    """Every post (question or answer) of the dumps under ``root`` as plain text, repeated
    with a suffix if needed to reach ``min_docs``."""
    cfg = CorpusConfig(name="se", format="stackexchange", paths=[str(root)])
    texts: list[str] = []
    for shard in list_shards(cfg):
        for _idx, post in iter_posts(shard.path):
            text = "\n\n".join(p for p in (post.get("Title", ""), html_to_text(
                post.get("Body", ""))) if p)
            if len(text) >= 20:
                texts.append(text)
    base = list(texts)
    i = 0
    while len(texts) < min_docs:
        texts.append(f"{base[i % len(base)]} (copy {i // len(base) + 1})")
        i += 1
    return texts


def run_bench_embed(data: Path, *, min_docs: int = 2000, overrides: list[str] | None = None,
                    shards: int = 8) -> dict[str, Any]:
    """Run both sides and return the figures (also logged)."""
    texts = stackexchange_texts(Path(data), min_docs)
    with tempfile.TemporaryDirectory(prefix="craft-bench-embed-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        per = (len(texts) + shards - 1) // shards
        for s in range(shards):
            with (corpus / f"part-{s:03d}.jsonl").open("w") as fh:
                for t in texts[s * per:(s + 1) * per]:
                    fh.write(json.dumps({"text": t}) + "\n")
        data_cfg = apply_overrides({
            "run_dir": str(Path(tmp) / "run"),
            "embed": {"corpora": [{"name": "bench", "format": "jsonl", "paths": [str(corpus)],
                                   "min_chars": 0}],
                      "export_h5": False},
        }, overrides or [])
        cfg = validate(EmbedStageConfig, data_cfg, "bench embed")
        ecfg = cfg.embed

        model = load_sentence_transformer(ecfg.model, None, ecfg.max_seq_length, ecfg.fp16)
        model.encode(texts[:16], batch_size=ecfg.encode_batch_size)  # warm-up
        t0 = time.perf_counter()
        base = encode_texts(model, texts, ecfg.encode_batch_size)
        base_s = time.perf_counter() - t0
        del model

        init_ray(cfg.ray)
        t0 = time.perf_counter()
        stats = run_embed(cfg)
        stage_s = time.perf_counter() - t0

        store = Path(tmp) / "run" / "embed" / "store"
        worst = 0.0
        n = 0
        for sh in read_info(store).shards:
            t = read_shard_table(store, sh)
            idx = int(sh.shard.split("-")[1].split(".")[0]) * per
            rows = t.column("row").to_numpy()
            got = vectors_of(t).astype(np.float32)
            ref = base[idx + rows].astype(np.float32)
            cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1)
                                                * np.linalg.norm(ref, axis=1))
            worst = max(worst, float(np.max(1.0 - cos)))
            n += len(rows)
    if n != len(texts) or stats["rows_out"] != len(texts):
        raise RuntimeError(f"stage embedded {n} of {len(texts)} texts")
    result = {
        "docs": len(texts),
        "baseline": "sentence-transformers encode, one process, all texts in one call",
        "baseline_docs_per_s": round(len(texts) / base_s, 2),
        "stage_docs_per_s": round(len(texts) / stage_s, 2),
        "ratio": round(base_s / stage_s, 3),
        "max_cos_dist": float(f"{worst:.3g}"),
        "baseline_s": round(base_s, 2),
        "stage_s": round(stage_s, 2),
        "stage_config": {k: v for k, v in ecfg.model_dump(mode="json").items()
                         if k not in ("corpora",)},
    }
    logger.info("bench embed: baseline %.1f docs/s, stage %.1f docs/s, ratio %.3f",
                result["baseline_docs_per_s"], result["stage_docs_per_s"], result["ratio"])
    return result
