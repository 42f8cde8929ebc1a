"""Leakage against the few-shots and n-gram decontamination against eval sets (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.stages.filter.config import DecontaminationConfig, DecontamSetConfig, FilterError
from craft_ray.stages.filter.dedup import shingles_batch
from craft_ray.stages.filter.rows import open_rows, with_reasons

# --- few-shot leakage (plain functions) ---------------------------------------------------


def leakage_scores(texts: Sequence[str], fewshot_texts: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Best token_set_ratio of each text against the few-shots and the few-shot's index.

    Texts are processed as thefuzz did (lower case, non-alphanumerics removed), which CRAFT
    relied on; rapidfuzz's default is no processing.
    """
    from rapidfuzz import fuzz, process, utils

    if not len(texts) or not len(fewshot_texts):
        return np.zeros(len(texts)), np.full(len(texts), -1)
    scores = process.cdist(list(texts), list(fewshot_texts), scorer=fuzz.token_set_ratio,
                           processor=utils.default_process, dtype=np.float32, workers=1)
    best = scores.argmax(axis=1)
    return scores[np.arange(len(texts)), best].astype(np.float64), best


def leakage_batch(table: Any, fewshot_texts: list[str], fewshot_ids: list[str],
                  threshold: float) -> Any:
    """Ray Data UDF (pyarrow): mark rows whose best few-shot ratio >= threshold."""
    open_ = open_rows(table)
    texts = [str(t) for t, o in zip(table.column("sample_text").to_pylist(), open_) if o]
    score, best = leakage_scores(texts, fewshot_texts)
    it = iter(zip(score, best))
    reasons, details = [], []
    for o in open_:
        s, b = next(it) if o else (0.0, -1)
        hit = b >= 0 and s >= threshold
        reasons.append("fewshot_leakage" if hit else None)
        details.append(f"token_set_ratio {s:.1f} with few-shot {fewshot_ids[b]}" if hit
                       else None)
    return with_reasons(table, "fewshot_leakage", reasons, details)

# --- decontamination (plain functions) ----------------------------------------------------


def _walk(value: Any, path: list[str]) -> list[str]:
    if isinstance(value, list):
        return [s for v in value for s in _walk(v, path)]
    if not path:
        if isinstance(value, str):
            return [value]
        if isinstance(value, Mapping):
            return [s for v in value.values() for s in _walk(v, [])]
        return [] if value is None else [str(value)]
    if isinstance(value, Mapping) and path[0] in value:
        return _walk(value[path[0]], path[1:])
    return []


def eval_item_text(record: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The text of one eval item: the strings at the dotted paths, joined by newlines."""
    return "\n".join(s for f in fields for s in _walk(record, f.split(".")))


def load_decontam_set(cfg: DecontamSetConfig, base_dir: str | Path | None = None) -> list[str]:
    """Texts of an evaluation set; a missing file or fields that give no text is an error."""
    from craft_ray.tasks.fewshots import read_json_lines

    texts: list[str] = []
    for _i, rec in read_json_lines(cfg.path, base_dir, FilterError,
                                   f"eval set {cfg.name}: file"):
        texts.append(eval_item_text(rec, cfg.text_fields))
        if cfg.limit and len(texts) >= cfg.limit:
            break
    if not texts or not any(t.strip() for t in texts):
        raise FilterError(f"eval set {cfg.name}: no text at fields {cfg.text_fields} in "
                          f"{cfg.path}; "
                          "set text_fields to dotted paths of the items' text fields")
    return texts


class NgramIndex:
    """Sorted n-gram hashes of an eval set with the item each came from (for membership)."""

    def __init__(self, texts: Sequence[str], n: int) -> None:
        hashes, counts = shingles_batch(list(texts), n)
        items = np.repeat(np.arange(len(texts)), counts)
        # Texts shorter than n words give one whole-text shingle; drop those, they are not
        # n-grams and would only match an identical short sample.
        long_enough = np.repeat(np.array([len(t.split()) >= n for t in texts]), counts)
        hashes, items = hashes[long_enough], items[long_enough]
        order = np.lexsort((items, hashes))
        self.hashes = hashes[order]
        self.items = items[order]
        self.n = n
        self.num_items = len(texts)

    def hits(self, texts: Sequence[str], max_items: int) -> list[list[int]]:
        """For each text, the eval items (sorted, at most ``max_items``) sharing an n-gram."""
        if not len(texts):
            return []
        hashes, counts = shingles_batch(list(texts), self.n)
        out: list[list[int]] = []
        pos = 0
        for t, c in zip(texts, counts):
            h = hashes[pos:pos + c]
            pos += c
            if len(t.split()) < self.n or not len(self.hashes):
                out.append([])
                continue
            lo = np.searchsorted(self.hashes, h, side="left")
            hi = np.searchsorted(self.hashes, h, side="right")
            found = [self.items[a:b] for a, b in zip(lo, hi) if b > a]
            if not found:
                out.append([])
                continue
            out.append(np.unique(np.concatenate(found))[:max_items].tolist())
        return out


def overlap_summary(hit_lists: Sequence[Sequence[int]], num_items: int) -> dict[str, Any]:
    """Samples with any overlap and eval items touched, as counts and percentages."""
    n = len(hit_lists)
    samples = sum(1 for h in hit_lists if len(h))
    touched = len({i for h in hit_lists for i in h})
    return {"samples": n, "samples_overlapping": samples,
            "samples_overlapping_pct": round(100.0 * samples / n, 3) if n else 0.0,
            "eval_items": num_items, "eval_items_overlapping": touched,
            "eval_items_overlapping_pct": round(100.0 * touched / num_items, 3)
            if num_items else 0.0}


def decontam_batch(table: Any, indexes: Any, drop_n: int, drop: bool,
                   max_hits: int) -> Any:
    """Ray Data UDF (pyarrow): per eval set and n, the eval items sharing an n-gram.

    Adds ``_decontam`` (JSON: ``{"set:n": [items...]}``) and marks rows overlapping any set
    at ``drop_n`` when ``drop``.
    """
    import ray

    idx = ray.get(indexes) if isinstance(indexes, ray.ObjectRef) else indexes
    open_ = open_rows(table)
    texts = [str(t) for t, o in zip(table.column("sample_text").to_pylist(), open_) if o]
    per_row: list[dict[str, list[int]]] = [{} for _ in texts]
    for (name, n), index in idx.items():
        for row, h in zip(per_row, index.hits(texts, max_hits)):
            if h:
                row[f"{name}:{n}"] = h
    it = iter(per_row)
    rows: list[dict[str, list[int]] | None] = [next(it) if o else None for o in open_]
    reasons, details = [], []
    for row in rows:
        if row is None:
            reasons.append(None)
            details.append(None)
            continue
        sets = sorted(k.split(":")[0] for k in row if int(k.split(":")[1]) == drop_n)
        hit = drop and bool(sets)
        reasons.append("eval_contamination" if hit else None)
        details.append(f"{drop_n}-gram overlap with {', '.join(sets)}" if hit else None)
    import pyarrow as pa

    table = table.append_column("_decontam", pa.array(
        [None if r is None else json.dumps(r) for r in rows], pa.string()))
    return with_reasons(table, "decontamination", reasons, details)


def decontam_step(ds: Any, cfg: DecontaminationConfig, eval_texts: dict[str, list[str]],
                   report: dict[str, Any]) -> Any:
    import ray

    ns = sorted({cfg.ngram, *cfg.report_ngrams})
    indexes = {(name, n): NgramIndex(texts, n) for name, texts in eval_texts.items()
               for n in ns}
    marked = ds.map_batches(decontam_batch, batch_size=cfg.batch_size, batch_format="pyarrow",
                            fn_kwargs={"indexes": ray.put(indexes), "drop_n": cfg.ngram,
                                       "drop": cfg.drop,
                                       "max_hits": cfg.max_hits_per_row}).materialize()
    hits: dict[str, list[list[int]]] = {f"{name}:{n}": [] for name, n in indexes}
    for b in marked.select_columns(["_decontam"]).iter_batches(batch_format="pyarrow",
                                                                batch_size=65_536):
        for raw in b.column("_decontam").to_pylist():
            if raw is None:  # rejected by an earlier step
                continue
            row = json.loads(raw)
            for key, lst in hits.items():
                lst.append(row.get(key, []))
    report.update({
        "ngram": cfg.ngram, "report_ngrams": [n for n in ns if n != cfg.ngram],
        "drop": cfg.drop, "max_hits_per_row": cfg.max_hits_per_row,
        "eval_sets": {
            name: {"path": next(e.path for e in cfg.eval_sets if e.name == name),
                   "items": len(texts),
                   **{str(n): overlap_summary(hits[f"{name}:{n}"], len(texts)) for n in ns}}
            for name, texts in eval_texts.items()},
        "note": "computed on the samples entering the step (after exact dedup and leakage); "
                "per-dataset figures under 'datasets'",
    })
    return marked
