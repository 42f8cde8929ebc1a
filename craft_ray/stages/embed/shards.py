"""Reading corpus shards into a Dataset of documents; unreadable documents to a rejects file."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from craft_ray.runtime import storage
from craft_ray.runtime.progress import report_progress
from craft_ray.store.corpus import CorpusConfig, Shard, read_shard
from craft_ray.store.vectors import (
    manifest_path,
)

# --- per-batch functions (plain Python; Ray runs them) ------------------------------------


class _RejectWriter:
    """Streams a shard's rejects to Parquet through :func:`storage.write_once`: the temporary
    file opened with the first rejects is renamed (or uploaded) on close."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.writer: Any = None
        self._tmp = ExitStack()  # holds the open atomic_path until close

    def add(self, rec: dict[str, Any]) -> None:
        self.rows.append({k: rec[k] for k in ("doc_id", "corpus", "shard", "row",
                                               "reject_reason", "reject_detail", "metadata",
                                               "raw")})
        if len(self.rows) >= 2048:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=REJECT_SCHEMA())
        if self.writer is None:
            tmp = self._tmp.enter_context(storage.write_once(self.path))
            self.writer = pq.ParquetWriter(tmp, table.schema)
        self.writer.write_table(table)
        self.rows = []

    def close(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self._tmp.close()  # the rename (or the upload)
        else:
            storage.remove(self.path)


def REJECT_SCHEMA() -> Any:  # noqa: N802 - a constant built lazily (pyarrow import)
    import pyarrow as pa

    return pa.schema([("doc_id", pa.string()), ("corpus", pa.string()), ("shard", pa.string()),
                      ("row", pa.int64()), ("reject_reason", pa.string()),
                      ("reject_detail", pa.string()), ("metadata", pa.string()),
                      ("raw", pa.string())])


def rejects_path(stage_dir: str | Path, corpus: str, shard: str) -> str:
    return storage.join(stage_dir, "rejects", corpus, f"{shard}.parquet")


def _docs_batch(buf: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {
        "doc_id": np.array([r["doc_id"] for r in buf], dtype=object),
        "corpus": np.array([r["corpus"] for r in buf], dtype=object),
        "shard": np.array([r["shard"] for r in buf], dtype=object),
        "row": np.array([r["row"] for r in buf], dtype=np.int64),
        "text": np.array([r["text"] for r in buf], dtype=object),
        "text_len": np.array([r["text_len"] for r in buf], dtype=np.int32),
    }


def read_shards(batch: dict[str, np.ndarray], corpora: dict[str, dict[str, Any]], store: str,
                stage_dir: str, chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: stream the documents of each shard in ``batch`` in blocks.

    Rejects go to the shard's rejects file; when the file has been read to its end the
    shard's manifest (documents accepted, rejects by reason) is written. The manifest is the
    reference :func:`craft_ray.store.vectors.finalize_shard` checks the embedded parts against.
    """
    for corpus, path, shard_name in zip(batch["corpus"], batch["path"], batch["shard"]):
        cfg = CorpusConfig.model_validate(corpora[str(corpus)])
        shard = Shard(str(corpus), str(path), str(shard_name))
        rejects = _RejectWriter(rejects_path(stage_dir, shard.corpus, shard.shard))
        reasons: Counter[str] = Counter()
        n_records = n_docs = chars = 0
        buf: list[dict[str, Any]] = []
        for rec in read_shard(shard, cfg):
            n_records += 1
            if rec["reject_reason"] is not None:
                reasons[rec["reject_reason"]] += 1
                rejects.add(rec)
                continue
            n_docs += 1
            chars += rec["text_len"]
            buf.append(rec)
            if len(buf) >= chunk_rows:
                yield _docs_batch(buf)
                buf = []
        if buf:
            yield _docs_batch(buf)
        rejects.close()
        if reasons:  # for the console's line: rejects so far
            report_progress(rejects=sum(reasons.values()))
        storage.write_json(manifest_path(store, shard.corpus, shard.shard), {
            "corpus": shard.corpus, "shard": shard.shard, "path": shard.path,
            "num_records": n_records, "num_docs": n_docs, "chars": chars,
            "rejects": dict(reasons),
        })
