"""Parsing generations into task records; drops and rejects with their reasons."""

from __future__ import annotations

import json
from typing import Any

from craft_ray.runtime.progress import report_progress
from craft_ray.tasks.base import MALFORMED_JSON, NO_JSON, Task, TaskValidationError
from craft_ray.tasks.registry import get_task

# Fixed reasons of prompt-level drops and generation-level rejects (counted in stats.json).
DROP_EMPTY = "Empty document text."

DROP_TOO_LONG = "Prompt longer than max_prompt_tokens."

DROP_NO_ROOM = "Few-shots leave too little room for the text."

REJECT_TRUNCATED = "Truncated at max tokens."

# --- parsing (plain function) -------------------------------------------------------------


def source_document(messages: str | None) -> str:
    """The document text of a prompt: the part of its last user turn after the separator."""
    from craft_ray.stages.generate.prompts import SEPARATOR  # prompts imports this module

    if not messages:
        return ""
    users = [m["content"] for m in json.loads(messages) if m.get("role") == "user"]
    return users[-1].rsplit(SEPARATOR, 1)[-1] if users else ""


def parse_row(task: Task, text: str, finish_reason: str, error: str, source: str = ""
              ) -> tuple[dict[str, Any] | None, str, str]:
    """(record or None, reject reason, detail) of one generation; ``source`` is the document
    it was generated from (for the task's no-verbatim-copy rules)."""
    if error:
        return None, error, ""
    try:
        return task.parse(text, source), "", ""
    except TaskValidationError as exc:
        reason = str(exc)
        if finish_reason == "length" and reason in (MALFORMED_JSON, NO_JSON):
            return None, REJECT_TRUNCATED, reason
        return None, reason, ""


GENERATION_COLUMNS = (
    "sample_id", "task", "doc_id", "corpus", "retrieved_by", "fewshot_ids", "variant",
    "prompt_hash", "prompt_tokens", "text_truncated", "text", "tokens_in", "tokens_out",
    "gen_seconds", "finish_reason", "error", "error_detail",
)


def parse_batch(batch: Any, task_spec: Any) -> Any:
    """Ray Data UDF (pyarrow batches): add ``status``, ``reject_reason``, ``reject_detail``,
    ``record`` (JSON) and ``sample_text``; drop the heavy prompt columns."""
    import pyarrow as pa

    task = get_task(task_spec)
    cols = {c: batch.column(c).to_pylist() for c in ("text", "finish_reason", "error")}
    msgs = (batch.column("messages").to_pylist() if "messages" in batch.column_names
            else [""] * batch.num_rows)
    status, reasons, details, records, texts = [], [], [], [], []
    for text, fin, err, m in zip(cols["text"], cols["finish_reason"], cols["error"], msgs):
        rec, reason, detail = parse_row(task, text or "", fin or "", err or "",
                                        source_document(m))
        status.append("clean" if rec is not None else "reject")
        reasons.append(reason)
        details.append(detail)
        records.append(json.dumps(rec, ensure_ascii=False) if rec is not None else "")
        texts.append(task.sample_text(rec) if rec is not None else "")
    if "reject" in status:  # the console's line: rejects so far
        report_progress(rejects=status.count("reject"))
    out = batch.select([c for c in GENERATION_COLUMNS if c in batch.column_names])
    for name, vals in (("status", status), ("reject_reason", reasons),
                       ("reject_detail", details), ("record", records),
                       ("sample_text", texts)):
        out = out.append_column(name, pa.array(vals, type=pa.string()))
    return out


def _record_types(task: Task) -> dict[str, Any]:
    import pyarrow as pa

    types = {}
    props = task.output_schema().get("properties", {})
    ren = dict(task.variants[0].renames)
    for f in task.record_fields:
        t = (props.get(ren.get(f, f)) or {}).get("type")
        types[f] = {"array": pa.list_(pa.string()), "integer": pa.int64(),
                    "number": pa.float64(), "boolean": pa.bool_()}.get(t, pa.string())
    return types


def _raw_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("sample_id", pa.string()), ("task", pa.string()), ("doc_id", pa.string()),
        ("corpus", pa.string()), ("retrieved_by", pa.list_(pa.string())),
        ("fewshot_ids", pa.list_(pa.string())), ("variant", pa.string()),
        ("prompt_hash", pa.string()), ("prompt_tokens", pa.int64()),
        ("text_truncated", pa.bool_()), ("text", pa.string()), ("tokens_in", pa.int64()),
        ("tokens_out", pa.int64()), ("gen_seconds", pa.float64()),
        ("finish_reason", pa.string()), ("status", pa.string()),
    ])


def _rejects_schema() -> Any:
    import pyarrow as pa

    return pa.schema([
        ("sample_id", pa.string()), ("task", pa.string()), ("doc_id", pa.string()),
        ("corpus", pa.string()), ("fewshot_ids", pa.list_(pa.string())),
        ("prompt_hash", pa.string()), ("reject_reason", pa.string()),
        ("reject_detail", pa.string()), ("error_detail", pa.string()),
        ("finish_reason", pa.string()), ("tokens_out", pa.int64()), ("text", pa.string()),
    ])


def split_outputs(rows: list[dict[str, Any]], task: Task) -> dict[str, Any]:
    """raw / clean / rejects tables from parsed generation rows (sorted by sample_id)."""
    import pyarrow as pa

    rows = sorted(rows, key=lambda r: r["sample_id"])
    raw_s, rej_s = _raw_schema(), _rejects_schema()
    raw = pa.Table.from_pylist([{k: r[k] for k in raw_s.names} for r in rows], schema=raw_s)
    rejects = pa.Table.from_pylist(
        [{k: r[k] for k in rej_s.names} for r in rows if r["status"] != "clean"], schema=rej_s)
    types = _record_types(task)
    prov = [("sample_id", pa.string()), ("task", pa.string()), ("doc_id", pa.string()),
            ("corpus", pa.string()), ("fewshot_ids", pa.list_(pa.string())),
            ("retrieved_by", pa.list_(pa.string())), ("variant", pa.string()),
            ("prompt_hash", pa.string()), ("sample_text", pa.string())]
    schema = pa.schema([(f, types[f]) for f in task.record_fields] + prov)
    clean_rows = [{**json.loads(r["record"]), **{k: r[k] for k, _ in prov}}
                  for r in rows if r["status"] == "clean"]
    try:
        clean = pa.Table.from_pylist(clean_rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a custom schema with unusual types
        clean = pa.Table.from_pylist(clean_rows)
    return {"raw": raw, "clean": clean, "rejects": rejects}
