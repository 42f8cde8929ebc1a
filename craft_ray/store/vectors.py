"""The embedding store: Parquet shards of L2-normalised float16 vectors with stable doc ids.

Layout (``STORE`` is ``RUN_DIR/embed/store`` unless configured otherwise)::

    STORE/
      store.json                          StoreInfo: model, dim, shards and their row counts
      data/{corpus}/{shard}.parquet       one file per source shard, rows sorted by `row`
      _parts/{corpus}/{shard}/*.parquet   transient, written while a shard is being embedded
      _manifests/{corpus}/{shard}.json    written by the reader when it finished the shard

Columns of a data file: ``doc_id`` (string), ``row`` (int64, position in the source shard),
``text_len`` (int32) and ``embedding`` (fixed_size_list<halffloat>[dim]).

Invariant: a ``data/`` file exists only for a shard whose every accepted document was embedded
exactly once (it is written by :func:`finalize_shard` after checking the parts against the
reader's manifest, through a temporary file and a rename). ``store.json`` is written last.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from craft_ray.config import StrictModel
from craft_ray.runtime import storage

STORE_INFO = "store.json"


class StoreError(ValueError):
    """An embedding store is missing, incomplete or not what the caller expects."""


class ShardInfo(StrictModel):
    corpus: str = Field(description="Corpus name.")
    shard: str = Field(description="Source shard name, relative to the corpus root.")
    file: str = Field(description="Data file, relative to the store folder.")
    num_rows: int = Field(ge=0, description="Embedded documents in this shard.")


class StoreInfo(StrictModel):
    """What ``store.json`` holds: enough to check a store before using it."""

    model: str = Field(description="Embedding model id or path as configured.")
    dim: int = Field(ge=1, description="Vector dimension.")
    dtype: str = Field(default="float16", description="Stored vector dtype.")
    normalized: bool = Field(default=True, description="Vectors are L2-normalised.")
    max_seq_length: int | None = Field(default=None, description="Model max sequence length.")
    shards: list[ShardInfo] = Field(default_factory=list, description="Data files, sorted.")
    corpora: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The corpus configs the store was built from (to fetch documents back).",
    )
    shard_paths: dict[str, str] = Field(
        default_factory=dict,
        description="Absolute source file of each shard, keyed '{corpus}/{shard}'.",
    )

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)


def data_path(store: str | Path, corpus: str, shard: str) -> str:
    return storage.join(store, "data", corpus, f"{shard}.parquet")


def parts_dir(store: str | Path, corpus: str, shard: str) -> str:
    return storage.join(store, "_parts", corpus, shard)


def manifest_path(store: str | Path, corpus: str, shard: str) -> str:
    return storage.join(store, "_manifests", corpus, f"{shard}.json")


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """A [N, dim] array as Arrow fixed_size_list<halffloat>[dim]."""
    vec = np.ascontiguousarray(vectors, dtype=np.float16)
    if vec.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {vec.shape}")
    flat = pa.array(vec.reshape(-1), type=pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, vec.shape[1])


def vectors_of(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """The [N, dim] float16 matrix of an ``embedding`` column (zero-copy where possible)."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def write_store_table(table: pa.Table, path: str | Path) -> None:
    """Write a store data file (or part) with the store's Parquet layout.

    Vectors are neither dictionary-encoded nor compressed: float16 embeddings gain nothing
    from either, and retrieval reads them again and again. Dictionary encoding made reading
    100k x 384 vectors ~8x slower (2.36 s vs 0.28 s); Snappy roughly doubled the decode
    time of a random 62,500 x 384 file (0.55 s vs 0.23 s). Row groups of 65,536 rows let readers
    stream a file in bounded memory.
    """
    pq.write_table(table, path, row_group_size=65_536, use_dictionary=["doc_id"],
                   compression={c: ("none" if c == "embedding" else "snappy")
                                for c in table.column_names})


def write_part(store: str | Path, corpus: str, shard: str, rows: np.ndarray, doc_ids: list[str],
               text_lens: np.ndarray, vectors: np.ndarray) -> str:
    """Write one part of a shard. Its name is a hash of its rows, so a retried write of the same
    rows replaces the same file (or object) instead of adding a duplicate."""
    rows = np.asarray(rows, dtype=np.int64)
    digest = hashlib.sha1(rows.tobytes()).hexdigest()[:20]
    out = storage.join(parts_dir(store, corpus, shard),
                       f"part-{int(rows.min()):012d}-{digest}.parquet")
    table = pa.table({
        "doc_id": pa.array(doc_ids, type=pa.string()),
        "row": pa.array(rows, type=pa.int64()),
        "text_len": pa.array(np.asarray(text_lens, dtype=np.int32), type=pa.int32()),
        "embedding": embedding_array(vectors),
    })
    with storage.write_once(out) as tmp:
        write_store_table(table, tmp)
    return out


def finalize_shard(store: str | Path, corpus: str, shard: str) -> int:
    """Merge a shard's parts into its data file, exactly once per document.

    Rows written twice (a retried task) are kept once; the result must hold exactly the
    documents the reader accepted (from its manifest), else :class:`StoreError`.
    Returns the number of rows written.
    """
    man_p = manifest_path(store, corpus, shard)
    if not storage.is_file(man_p):
        raise StoreError(f"shard {corpus}/{shard}: reader manifest missing; rerun the stage")
    manifest = storage.read_json(man_p)
    expected = int(manifest["num_docs"])
    pdir = parts_dir(store, corpus, shard)
    files = [f for f in storage.list_files(pdir, suffix=".parquet")
             if storage.name(f).startswith("part-")]
    if files:
        table = pa.concat_tables([storage.read_table(f) for f in files])
        table = table.sort_by("row")
        rows = table.column("row").to_numpy()
        keep = np.ones(len(rows), dtype=bool)
        keep[1:] = rows[1:] != rows[:-1]
        if not keep.all():
            table = table.filter(pa.array(keep))
    else:
        table = pa.table({"doc_id": pa.array([], pa.string()), "row": pa.array([], pa.int64()),
                          "text_len": pa.array([], pa.int32()),
                          "embedding": pa.array([], pa.list_(pa.float16(), 1))})
    if table.num_rows != expected:
        raise StoreError(
            f"shard {corpus}/{shard}: {table.num_rows} embedded rows but the reader accepted "
            f"{expected}; the parts are incomplete. Rerun the stage (finished shards are kept)."
        )
    # the data file is written whole (renamed, or one PUT) before the parts go
    with storage.write_once(data_path(store, corpus, shard)) as tmp:
        write_store_table(table, tmp)
    storage.remove(pdir)
    return table.num_rows


def read_info(store: str | Path) -> StoreInfo:
    """Read ``store.json``; a missing or unfinished store is a :class:`StoreError`."""
    p = storage.join(store, STORE_INFO)
    if not storage.is_file(p):
        raise StoreError(
            f"{storage.redact(store)} is not a finished embedding store (no {STORE_INFO}); run "
            "`craft-ray embed --config ...` first, or point at RUN_DIR/embed/store"
        )
    return StoreInfo.model_validate_json(storage.read_text(p))


def write_info(store: str | Path, info: StoreInfo) -> None:
    storage.write_json(storage.join(store, STORE_INFO), info.model_dump(mode="json"))


def read_shard_table(store: str | Path, shard: ShardInfo,
                     columns: list[str] | None = None) -> pa.Table:
    """One data file of the store as an Arrow table."""
    return storage.read_table(storage.join(store, shard.file), columns=columns)


def export_h5(store: str | Path, out: str | Path) -> dict[str, Any]:
    """Export the store to CRAFT's ``.h5`` layout.

    One group per corpus, one dataset per source shard (``/`` in a shard name becomes
    ``__``), shape [N, dim], float16, row i = the i-th embedded document of that shard in
    source order. The source row numbers are kept beside them in ``/_rows/{corpus}/{name}``
    (int64), so an h5 row maps back to a document id. Written to a temporary file, then renamed
(or uploaded in one piece to an object store).
    """
    import h5py

    info = read_info(store)
    counts: dict[str, int] = {}
    with storage.write_once(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["model"] = info.model
        f.attrs["dim"] = info.dim
        f.attrs["normalized"] = info.normalized
        for sh in info.shards:
            table = read_shard_table(store, sh, columns=["row", "embedding"])
            name = sh.shard.replace("/", "__")
            vec = vectors_of(table) if table.num_rows else np.zeros((0, info.dim), np.float16)
            grp = f.require_group(sh.corpus)
            grp.create_dataset(name, data=vec.astype(np.float16), dtype="float16")
            f.require_group("_rows").require_group(sh.corpus).create_dataset(
                name, data=table.column("row").to_numpy().astype(np.int64))
            counts[f"{sh.corpus}/{name}"] = int(vec.shape[0])
    return counts
