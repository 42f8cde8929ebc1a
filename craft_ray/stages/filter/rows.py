"""Row bookkeeping of the filter stage: drop marks with reasons, survivors, rejects, counts."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

REJECT_COLUMNS = ("reject_step", "reject_reason", "reject_detail")

PROVENANCE_COLUMNS = ("sample_id", "task", "doc_id", "corpus", "fewshot_ids")

# --- batch helpers ------------------------------------------------------------------------


def with_reasons(table: Any, step: str, reasons: list[str | None],
                  details: list[str | None]) -> Any:
    """Set the reject columns of the rows this step rejects; earlier rejections stay."""
    import pyarrow as pa

    prev = {c: table.column(c).to_pylist() if c in table.column_names
            else [None] * table.num_rows for c in REJECT_COLUMNS}
    new = {"reject_step": [step if r else None for r in reasons],
           "reject_reason": reasons, "reject_detail": details}
    for name in REJECT_COLUMNS:
        vals = [p if prev["reject_reason"][i] is not None else v
                for i, (p, v) in enumerate(zip(prev[name], new[name]))]
        col = pa.array(vals, pa.string())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, col)
        else:
            table = table.append_column(name, col)
    return table


def open_rows(table: Any) -> list[bool]:
    """Which rows no earlier step rejected."""
    if "reject_reason" not in table.column_names:
        return [True] * table.num_rows
    return [r is None for r in table.column("reject_reason").to_pylist()]


def mark_drops_batch(table: Any, drops: Any, step: str, reason: str) -> Any:
    """Ray Data UDF (pyarrow): mark rows whose sample_id is a key of ``drops`` (dup -> kept)."""
    import ray

    d = ray.get(drops) if isinstance(drops, ray.ObjectRef) else drops
    ids = [str(x) for x in table.column("sample_id").to_pylist()]
    reasons = [reason if i in d else None for i in ids]
    details = [f"duplicate of {d[i]}" if i in d else None for i in ids]
    return with_reasons(table, step, reasons, details)


def priority_batch(table: Any, seed: int) -> Any:
    """Ray Data UDF (pyarrow): ``_priority`` = uint64 of blake2b(seed:sample_id)."""
    import pyarrow as pa

    pri = [int.from_bytes(hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(),
                          "big") >> 1 for s in table.column("sample_id").to_pylist()]
    return table.append_column("_priority", pa.array(pri, pa.int64()))

# --- the stage ----------------------------------------------------------------------------


def init_rejects_batch(table: Any) -> Any:
    """Ray Data UDF (pyarrow): add empty ``reject_step/reason/detail`` columns."""
    n = table.num_rows
    return with_reasons(table, "", [None] * n, [None] * n)


def _keep_rows(table: Any, rejected: bool) -> Any:
    import pyarrow.compute as pc

    mask = pc.is_valid(table.column("reject_reason"))
    return table.filter(mask if rejected else pc.invert(mask))


def survivors_of(ds: Any) -> Any:
    """Rows no step has rejected (lazy)."""
    return ds.map_batches(_keep_rows, batch_format="pyarrow", fn_kwargs={"rejected": False})


def rejected_of(ds: Any) -> Any:
    """Rows some step rejected (lazy)."""
    return ds.map_batches(_keep_rows, batch_format="pyarrow", fn_kwargs={"rejected": True})


def mark_dedup(ds: Any, find: Callable[[Any], dict[str, str]], step: str, reason: str) -> Any:
    import ray

    drops = find(survivors_of(ds))
    return ds.map_batches(mark_drops_batch, batch_format="pyarrow",
                          fn_kwargs={"drops": ray.put(drops), "step": step, "reason": reason})


def step_counts(ds: Any, rows_in: int, order: Sequence[str]) -> list[dict[str, Any]]:
    """Per step: rows in, rows out, dropped and reasons, from the marked dataset."""
    per: dict[str, Counter[str]] = {s: Counter() for s in order}
    for b in ds.select_columns(["reject_step", "reject_reason"]).iter_batches(
            batch_format="pyarrow", batch_size=65_536):
        for st, rs in zip(b.column("reject_step").to_pylist(),
                          b.column("reject_reason").to_pylist()):
            if st is not None:
                per.setdefault(st, Counter())[rs] += 1
    out, n = [], rows_in
    for st in order:
        dropped = sum(per[st].values())
        out.append({"step": st, "rows_in": n, "rows_out": n - dropped, "dropped": dropped,
                    "reasons": dict(per[st])})
        n -= dropped
    return out
