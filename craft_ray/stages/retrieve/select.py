"""Selecting documents from the ranked pools and fetching their texts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from craft_ray.runtime import storage
from craft_ray.stages.retrieve.config import Mode
from craft_ray.store.vectors import StoreError, StoreInfo

# --- selection ----------------------------------------------------------------------------


@dataclass
class Selected:
    """One selected document with its provenance."""

    u: int                          # index into the pool's doc arrays
    selected_by: str                # "per_shot" | "mean" | "both"
    shots: list[int]                # few-shots whose own list holds it
    shot_ranks: list[int]           # 1-based rank in each of those lists
    mean_rank: int | None           # 1-based rank in the mean list


def select(mode: Mode, k: int, per_shot: list[np.ndarray], mean: np.ndarray) -> list[Selected]:
    """Pick ``k`` documents from ranked lists, deduplicated by document.

    per_shot: round-robin over the few-shots by rank (rank 1 of every few-shot, then rank 2,
    ...). mean: the mean list in order. mixed: alternately the next new document of the
    per-shot stream and of the mean stream, so each side supplies half; when one side runs
    out the other fills up. Provenance lists every list that holds the document (within the
    oversampled lists), so a document found by both sides is ``both``.
    """
    shot_hits: dict[int, list[tuple[int, int]]] = {}
    depth = max((len(p) for p in per_shot), default=0)
    stream_shot: list[int] = []
    for r in range(depth):
        for i, lst in enumerate(per_shot):
            if r < len(lst):
                u = int(lst[r])
                shot_hits.setdefault(u, []).append((i, r + 1))
                stream_shot.append(u)
    mean_rank = {int(u): r + 1 for r, u in enumerate(mean)}
    stream_mean = [int(u) for u in mean]

    chosen: dict[int, None] = {}
    if mode == "per_shot":
        streams = [stream_shot]
    elif mode == "mean":
        streams = [stream_mean]
    else:
        streams = [stream_shot, stream_mean]
    pos = [0] * len(streams)
    turn = 0
    while len(chosen) < k and any(p < len(s) for p, s in zip(pos, streams)):
        s = streams[turn]
        while pos[turn] < len(s) and s[pos[turn]] in chosen:
            pos[turn] += 1
        if pos[turn] < len(s):
            chosen[s[pos[turn]]] = None
            pos[turn] += 1
        turn = (turn + 1) % len(streams)
    out = []
    for u in chosen:
        hits = sorted(shot_hits.get(u, []))
        in_mean = u in mean_rank
        by = "both" if hits and in_mean else ("per_shot" if hits else "mean")
        out.append(Selected(u, by, [h[0] for h in hits], [h[1] for h in hits],
                            mean_rank.get(u)))
    return out

# --- fetching documents back --------------------------------------------------------------


def fetch_shard_docs(batch: dict[str, np.ndarray], corpora: dict[str, dict[str, Any]]
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: stream each shard's source file and yield the wanted rows' texts.

    A wanted row that the reader no longer returns as a document (source file changed since
    embedding) comes back with ``reject_reason`` set instead of text.
    """
    from craft_ray.store.corpus import CorpusConfig, Shard, make_doc_id, read_shard

    for corpus, shard, path, rows_json in zip(batch["corpus"], batch["shard"], batch["path"],
                                              batch["rows"]):
        wanted = {int(r): int(n) for r, n in json.loads(str(rows_json))}
        cfg = CorpusConfig.model_validate(corpora[str(corpus)])
        found: dict[int, dict[str, Any]] = {}
        present = storage.is_file(str(path))  # a local file or an object
        if present:
            for rec in read_shard(Shard(str(corpus), str(path), str(shard)), cfg):
                r = rec["row"]
                if r in wanted and rec["reject_reason"] is None:
                    found[r] = rec
                    if len(found) == len(wanted):
                        break
        out: dict[str, list[Any]] = {"doc_id": [], "text": [], "metadata": [],
                                     "reject_reason": []}
        for r, n in sorted(wanted.items()):
            rec = found.get(r)
            out["doc_id"].append(make_doc_id(str(corpus), str(shard), r))
            if rec is None:
                why = "source_missing" if not present else "not_in_source"
                out["text"].append("")
                out["metadata"].append("")
                out["reject_reason"].append(why)
            elif rec["text_len"] != n:
                out["text"].append("")
                out["metadata"].append(rec["metadata"])
                out["reject_reason"].append("source_changed")
            else:
                out["text"].append(rec["text"])
                out["metadata"].append(rec["metadata"])
                out["reject_reason"].append("")  # "" = fetched (all-None columns turn to NaN)
        yield {k: np.array(v, dtype=object) for k, v in out.items()}


def fetch_docs(info: StoreInfo, docs: list[tuple[str, str, int, int]], num_cpus: float
               ) -> dict[str, dict[str, Any]]:
    """Texts of ``docs`` (corpus, shard, row, text_len), read back from the corpora by id."""
    import ray.data

    by_shard: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for corpus, shard, row, n in docs:
        by_shard.setdefault((corpus, shard), []).append((row, n))
    items = []
    for (corpus, shard), rows in sorted(by_shard.items()):
        path = info.shard_paths.get(f"{corpus}/{shard}")
        if path is None:
            raise StoreError(f"store.json has no source path for shard {corpus}/{shard}; "
                             "re-run `craft-ray embed` to rebuild the store metadata")
        items.append({"corpus": corpus, "shard": shard, "path": path,
                      "rows": json.dumps(sorted(rows))})
    if not items:
        return {}
    corpora = {c["name"]: c for c in info.corpora}
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fetch_shard_docs, batch_size=1, num_cpus=num_cpus, fn_kwargs={"corpora": corpora})
    out: dict[str, dict[str, Any]] = {}
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        for d, t, m, r in zip(batch["doc_id"], batch["text"], batch["metadata"],
                              batch["reject_reason"]):
            out[str(d)] = {"text": str(t), "metadata": str(m), "reject_reason": str(r)}
    return out
