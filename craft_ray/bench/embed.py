"""``craft-ray bench embed``: plain sentence-transformers ``encode`` vs the embed stage.

Both embed the same real texts (every post of the StackExchange dumps, HTML stripped, at least
``min_docs`` of them). Sides, each timed ``repeats`` times interleaved after a light warm-up
(:mod:`craft_ray.bench.measure`):

- ``encode``: the baseline, one in-process ``model.encode`` call over all texts in float32
  (:func:`craft_ray.models.embedder.plain_encode`: sentence-transformers sorts by characters
  internally; torch's default threads, i.e. every core); its model load is not timed. The
  stage batches by token count instead (:func:`craft_ray.models.embedder.encode_texts`);
- ``stage``: :func:`craft_ray.stages.embed.run_embed` with the config's defaults, from its
  start to its end: reading, actor start-up and model load, embedding, writing and finalising
  the store (Ray's own start is not timed: a cluster is started once, not per stage);
- ``int8_stage`` / ``int8_encode`` (``int8=True``): the same with ``embed.backend=onnx,
  embed.quantize=int8`` (ONNX Runtime, dynamic int8), in the stage and in-process.

``ratio`` = encode / stage time (>= 1.0: the stage keeps pace with plain encode);
``ratio_int8`` = encode / int8 stage time. Where the stage's time goes: the actors' model time
(``encode_seconds_this_run``) against the stage's wall time.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.bench.measure import (
    conditions,
    interleave,
    load_average,
    paired_ratio,
    summary,
    thread_report,
)
from craft_ray.config import apply_overrides, validate
from craft_ray.models.embedder import load_sentence_transformer, plain_encode
from craft_ray.runtime import init_ray
from craft_ray.stages.embed import EmbedStageConfig, run_embed
from craft_ray.stages.embed.stage import max_actors
from craft_ray.store.corpus import CorpusConfig, list_shards
from craft_ray.store.stackexchange import html_to_text, iter_posts
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


def _write_corpus(texts: list[str], folder: Path, shards: int) -> int:
    folder.mkdir(parents=True)
    per = (len(texts) + shards - 1) // shards
    for s in range(shards):
        with (folder / f"part-{s:03d}.jsonl").open("w") as fh:
            for t in texts[s * per:(s + 1) * per]:
                fh.write(json.dumps({"text": t}) + "\n")
    return per


def _stage_config(tmp: Path, corpus: Path, run: str, overrides: list[str]) -> Any:
    data = apply_overrides({
        "run_dir": str(tmp / run),
        "embed": {"corpora": [{"name": "bench", "format": "jsonl", "paths": [str(corpus)],
                               "min_chars": 0}],
                  "export_h5": False, "model_cache_dir": str(tmp / "_models")},
    }, overrides)
    return validate(EmbedStageConfig, data, "bench embed")


def _max_cos_dist(store: Path, base: np.ndarray, per: int) -> tuple[float, int]:
    worst, n = 0.0, 0
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
    return worst, n


@dataclass
class _Runs:
    """What the sides leave behind: the vectors of the in-process sides, the stats of the
    stage's runs (by side), the threads plain encode used."""

    base: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads_encode: dict[str, Any] = field(default_factory=dict)


def _sides(tmp: Path, texts: list[str], cfg: Any, overrides: list[str], int8: bool
           ) -> tuple[dict[str, Any], dict[str, Any], _Runs]:
    """The timed sides and their lighter warm-ups (see the module docstring)."""
    ecfg = cfg.embed
    model = load_sentence_transformer(ecfg.model, None, ecfg.max_seq_length, ecfg.fp16)
    runs_done = _Runs(threads_encode=thread_report())
    counter = iter(range(10_000))

    def encode_side(m: Any, key: str) -> float:
        t0 = time.perf_counter()
        runs_done.base[key] = plain_encode(m, texts, ecfg.encode_batch_size)
        return time.perf_counter() - t0

    def stage_side(extra: list[str], key: str, corpus: str = "corpus") -> float:
        run_cfg = _stage_config(tmp, tmp / corpus, f"run-{next(counter)}", overrides + extra)
        t0 = time.perf_counter()
        st = run_embed(run_cfg)
        took = time.perf_counter() - t0
        if corpus == "corpus":
            st["seconds_wall"] = took
            st["store"] = Path(run_cfg.run_dir) / "embed" / "store"
            runs_done.stats[key] = st
        return took

    sides = {"encode": lambda: encode_side(model, "encode"),
             "stage": lambda: stage_side([], "stage")}
    warm = {"encode": lambda: model.encode(texts[:64]),
            "stage": lambda: stage_side([], "warm", "warm")}
    if int8:
        int8_opts = ["embed.backend=onnx", "embed.quantize=int8"]
        q8 = load_sentence_transformer(ecfg.model, None, ecfg.max_seq_length, False,
                                       backend="onnx", quantize="int8",
                                       cache_dir=tmp / "_models")
        sides["int8_stage"] = lambda: stage_side(int8_opts, "int8_stage")
        sides["int8_encode"] = lambda: encode_side(q8, "int8_encode")
        warm["int8_stage"] = lambda: stage_side(int8_opts, "warm", "warm")
        warm["int8_encode"] = lambda: q8.encode(texts[:64])
    return sides, warm, runs_done


def _figures(n_docs: int, times: dict[str, list[float]], runs: _Runs, per: int,
             ecfg: Any) -> dict[str, Any]:
    """The JSON figures of the torch sides (and the int8 ones when they ran)."""
    worst, n = _max_cos_dist(runs.stats["stage"]["store"], runs.base["encode"], per)
    if n != n_docs:
        raise RuntimeError(f"stage embedded {n} of {n_docs} texts")
    ratio = paired_ratio(times["encode"], times["stage"])
    result: dict[str, Any] = {
        "docs": n_docs, "repeats": len(times["encode"]),
        "baseline": "sentence-transformers encode in float32, one process, all texts in "
                    "one call",
        "encode_s": summary(times["encode"]), "stage_s": summary(times["stage"]),
        "ratio": ratio["median"], "ratio_summary": ratio,
        "baseline_docs_per_s": round(n_docs / summary(times["encode"])["median"], 2),
        "stage_docs_per_s": round(n_docs / summary(times["stage"])["median"], 2),
        "max_cos_dist": float(f"{worst:.3g}"),
        "stage_time": _where_time_goes(runs.stats["stage"], max_actors(ecfg)),
        "threads_encode": runs.threads_encode,
        "stage_config": {k: v for k, v in ecfg.model_dump(mode="json").items()
                         if k not in ("corpora",)},
    }
    if "int8_stage" in times:
        worst8, _ = _max_cos_dist(runs.stats["int8_stage"]["store"], runs.base["encode"], per)
        ratio8 = paired_ratio(times["encode"], times["int8_stage"])
        result.update({
            "int8_stage_s": summary(times["int8_stage"]),
            "int8_encode_s": summary(times["int8_encode"]),
            "ratio_int8": ratio8["median"], "ratio_int8_summary": ratio8,
            "ratio_int8_encode": paired_ratio(times["encode"], times["int8_encode"])["median"],
            "int8_max_cos_dist": float(f"{worst8:.3g}"),
            "int8_stage_time": _where_time_goes(runs.stats["int8_stage"], max_actors(ecfg)),
        })
    return result


def run_bench_embed(data: Path, *, min_docs: int = 2000, overrides: list[str] | None = None,
                    shards: int = 8, repeats: int = 3, int8: bool = True,
                    max_docs: int | None = None) -> dict[str, Any]:
    """Run the sides interleaved and return the figures (also logged). ``max_docs`` cuts the
    texts short (smoke tests)."""
    load_before = load_average()
    texts = stackexchange_texts(Path(data), min_docs)[:max_docs]
    overrides = list(overrides or [])
    with tempfile.TemporaryDirectory(prefix="craft-bench-embed-") as tmp_s:
        tmp = Path(tmp_s)
        per = _write_corpus(texts, tmp / "corpus", shards)
        _write_corpus(texts[:64], tmp / "warm", 1)
        cfg = _stage_config(tmp, tmp / "corpus", "run", overrides)
        sides, warm, runs = _sides(tmp, texts, cfg, overrides, int8)
        init_ray(cfg.ray)
        times = interleave(sides, repeats=repeats, warmup=warm)
        result = _figures(len(texts), times, runs, per, cfg.embed)
    result.update(conditions(load_before))
    logger.info("bench embed: ratio %.3f (median of %d), int8 %s", result["ratio"], repeats,
                result.get("ratio_int8"))
    return result


def _where_time_goes(stats: dict[str, Any], actors: int = 1) -> dict[str, Any]:
    """The stage's wall time split into the actors' model time and the rest (Ray: read,
    schedule, write, finalise, actor start-up and model load). The model time is summed over
    the actors: with several, ``model_s`` is its mean per actor (``model_s_total`` the sum;
    an autoscaling pool is counted at its maximum size)."""
    wall = stats["seconds_wall"]
    total = stats["encode_seconds_this_run"]
    enc = total / max(1, actors)
    return {"wall_s": round(wall, 2), "model_s": round(enc, 2), "actors": actors,
            "model_s_total": round(total, 2),
            "other_s": round(wall - enc, 2), "other_frac": round((wall - enc) / wall, 3)}
