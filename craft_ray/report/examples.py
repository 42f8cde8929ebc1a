"""Report sections with real rows: samples beside their source documents, and one example of
every reject reason of every stage (so a reason in the counts table can be seen, not guessed).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import yaml

from craft_ray.runtime import storage

SNIPPET = 280  # characters of a text shown in a table cell


def _cut(text: Any, n: int = SNIPPET) -> str:
    """Whitespace folded, cut to ``n`` characters (the page's template escapes it)."""
    s = " ".join(str(text or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _table(headers: list[str], rows: list[list[Any]]) -> list[dict[str, Any]]:
    return [{"kind": "table", "headers": headers, "rows": rows}]


def _muted(text: str) -> list[dict[str, Any]]:
    return [{"kind": "muted", "text": text}]


def _rows(path: Path, columns: list[str] | None = None, limit: int | None = None
          ) -> list[dict[str, Any]]:
    """Rows of a Parquet file or a folder of them (missing or broken: none)."""
    import pyarrow.parquet as pq

    files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    out: list[dict[str, Any]] = []
    for f in files:
        if not f.is_file():
            continue
        try:
            names = pq.ParquetFile(f).schema_arrow.names
            cols = [c for c in (columns or names) if c in names]
            out.extend(pq.read_table(f, columns=cols).to_pylist())
        except Exception:  # noqa: BLE001 - a broken file must not break the report
            continue
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def _ids(value: Any) -> list[str]:
    """Few-shot ids as stored: a list, or its repr / JSON in a string column."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(value)]
        except (ValueError, SyntaxError):
            return [value]
    return [str(value)] if value else []


def _fewshot_texts(run: Path) -> dict[str, str]:
    """Few-shot id (``{file stem}:{line}``) -> its instruction, from the generate config."""
    cfg_path = run / "generate" / "config.yaml"
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        fs = (cfg.get("generate") or cfg).get("fewshots") or {}
        field = fs.get("instruction_field", "Instruction")
        stem = Path(storage.name(fs["path"])).stem  # few-shot ids: {file stem}:{line}
        lines = storage.read_text(fs["path"]).splitlines()  # a path or an s3:// URI
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return {}
    out = {}
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out[f"{stem}:{i}"] = str(rec.get(field, ""))
    return out


def samples_section(run: Path, n: int = 8) -> list[dict[str, Any]]:
    """The first ``n`` clean samples beside the start of their source document, its retrieval
    score and the few-shot the sample was asked to imitate."""
    samples = _rows(run / "generate" / "clean.parquet", limit=n)
    if not samples:
        return _muted("No generated samples yet.")
    docs = {r.get("doc_id"): r for r in _rows(run / "retrieve" / "corpus_samples.parquet",
                                          ["doc_id", "text", "score", "mean_score"])}
    shots = _fewshot_texts(run)
    rows = []
    for s in samples:
        doc = docs.get(s.get("doc_id"), {})
        score = doc.get("score")
        if score is None:
            score = doc.get("mean_score")
        fs_ids = _ids(s.get("fewshot_ids"))
        imitated = " · ".join(f"{i}: {_cut(shots.get(i, ''), 140)}" for i in fs_ids) or "-"
        rows.append([_cut(s.get("sample_text") or json.dumps(s, default=str)),
                     f"{s.get('doc_id', '')}: {_cut(doc.get('text', ''))}",
                     float(score) if isinstance(score, int | float) else "-",
                     imitated])
    return _table(["sample", "source document (start)", "retrieval score",
                   "few-shot imitated"], rows)


# (stage, where its rejects are, the column with the rejected text)
_REJECT_SOURCES = (
    ("embed", "embed/rejects", ("text", "raw", "detail")),
    ("retrieve", "retrieve/rejects.parquet", ("text",)),
    ("retrieve (leakage)", "retrieve/leakage.parquet", ("text",)),
    ("generate", "generate/rejects.parquet", ("text",)),
    ("generate (prompt drops)", "generate/prompt_drops.parquet", ("text", "doc_id")),
    ("filter", "filter/rejects", ("sample_text",)),
)


def _reason(row: dict[str, Any]) -> str:
    for key in ("reject_reason", "reason", "drop_reason", "error"):
        if row.get(key):
            return str(row[key])
    return "rejected"


def reject_examples_section(run: Path) -> list[dict[str, Any]]:
    """Per stage and reason: how many rows, and one example with its detail."""
    rows = []
    for stage, rel, text_cols in _REJECT_SOURCES:
        by_reason: dict[str, tuple[int, dict[str, Any]]] = {}
        for r in _rows(run / rel):
            reason = _reason(r)
            count, first = by_reason.get(reason, (0, r))
            by_reason[reason] = (count + 1, first)
        for reason, (count, ex) in sorted(by_reason.items()):
            text = next((ex[c] for c in text_cols if ex.get(c)), "")
            detail = ex.get("reject_detail") or ex.get("detail") or ""
            rows.append([stage, reason, count, _cut(detail, 160), _cut(text, 200)])
    for p in sorted((run / "evaluate" / "rejects").glob("*.jsonl")):
        by_reason_e: dict[str, tuple[int, dict[str, Any]]] = {}
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            count, first = by_reason_e.get(_reason(r), (0, r))
            by_reason_e[_reason(r)] = (count + 1, first)
        for reason, (count, ex) in sorted(by_reason_e.items()):
            rows.append([f"evaluate ({p.stem})", reason, count,
                         _cut(ex.get("detail", ""), 160), _cut(ex.get("raw", ""), 200)])
    if not rows:
        return _muted("No rejected rows.")
    return _table(["stage", "reason", "rows", "detail (first)", "example (first)"], rows)
