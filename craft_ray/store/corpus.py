"""Corpus readers: stream documents out of corpus shards with stable ids, rejects kept.

Every reader is a plain generator over one shard file (testable without Ray). Each document
gets a stable id ``{corpus}/{shard}#{row}``: ``shard`` is the file's path relative to the
corpus root and ``row`` the 0-based line (jsonl, text), row (Parquet) or ``<row>`` element
(StackExchange ``Posts.xml``) number. The same files give the same ids on every run.

A bad record never stops a reader: it comes out as a reject with a reason
(``malformed_json``, ``missing_text``, ``empty_text``, ``invalid_utf8``, ``too_short``,
``too_long``...). A missing path or an unreadable file is an error (:class:`CorpusError`).
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import Field, field_validator, model_validator

from craft_ray.config import StrictModel
from craft_ray.runtime import storage

CorpusFormat = Literal["c4", "jsonl", "stackexchange", "parquet", "text"]

_DEFAULT_GLOBS: dict[str, tuple[str, ...]] = {
    "c4": ("*.json.gz", "*.jsonl.gz", "*.json", "*.jsonl"),
    "jsonl": ("*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz"),
    "stackexchange": ("Posts.xml", "*/Posts.xml"),
    "parquet": ("*.parquet",),
    "text": ("*.txt", "*.txt.gz"),
}


class CorpusError(ValueError):
    """A corpus path is missing or a file cannot be read at all."""


class CorpusConfig(StrictModel):
    """One corpus: where its shards are and how to read them."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Corpus name; first part of every doc id (letters, digits, '_', '-', '.').",
    )
    format: CorpusFormat = Field(
        description="c4 (json/json.gz lines with text,url,timestamp), jsonl (configurable "
        "fields), stackexchange (Posts.xml dumps), parquet, text (one document per file, or "
        "per line with text_per_line)."
    )
    paths: list[str] = Field(
        min_length=1,
        description="Files, folders or glob patterns. Folders are searched recursively with "
        "the format's default patterns (see glob).",
    )
    glob: list[str] | None = Field(
        default=None,
        description="File patterns used inside folders (default by format, e.g. *.json.gz).",
    )
    text_field: str = Field(default="text", description="Field/column holding the text.")
    title_field: str | None = Field(
        default=None,
        description="Optional field/column with a title, prepended as 'title\\n\\ntext'.",
    )
    metadata_fields: list[str] | None = Field(
        default=None,
        description="Fields kept as metadata (default: url, timestamp for c4; none otherwise).",
    )
    text_per_line: bool = Field(
        default=False, description="format=text only: each non-empty line is a document."
    )
    min_chars: int = Field(
        default=200, ge=0, description="Shorter documents are rejected (CRAFT kept >= 200)."
    )
    max_chars: int = Field(
        default=25_000, ge=1, description="Longer documents are rejected (CRAFT kept <= 25,000)."
    )

    @field_validator("paths")
    @classmethod
    def _no_empty_paths(cls, v: list[str]) -> list[str]:
        if any(not p.strip() for p in v):
            raise ValueError("empty path in paths")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> CorpusConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self

    def kept_metadata(self) -> list[str]:
        if self.metadata_fields is not None:
            return self.metadata_fields
        return ["url", "timestamp"] if self.format == "c4" else []


@dataclass(frozen=True)
class Shard:
    """One source file of a corpus; ``shard`` is its stable relative name."""

    corpus: str
    path: str
    shard: str


def make_doc_id(corpus: str, shard: str, row: int) -> str:
    """The stable document id: ``{corpus}/{shard}#{row}``."""
    return f"{corpus}/{shard}#{row}"


def parse_doc_id(doc_id: str) -> tuple[str, str, int]:
    """Inverse of :func:`make_doc_id`: ``(corpus, shard, row)``."""
    head, _, row = doc_id.rpartition("#")
    corpus, _, shard = head.partition("/")
    if not head or not row.isdigit() or not shard:
        raise ValueError(f"not a craft_ray doc id: {doc_id!r} (expected CORPUS/SHARD#ROW)")
    return corpus, shard, int(row)


def list_shards(cfg: CorpusConfig, base_dir: str | Path | None = None) -> list[Shard]:
    """Expand the corpus' paths to a sorted list of shards with stable relative names.

    Relative paths are taken from ``base_dir`` (default: the working directory). The shard
    name is the path relative to the common folder of all matched files, so the same files
    give the same names wherever the corpus lives.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    patterns = cfg.glob or list(_DEFAULT_GLOBS[cfg.format])
    named: dict[str, str] = {}  # absolute file -> shard name
    for raw in cfg.paths:
        if storage.is_uri(raw):
            for f, root in _uri_files(cfg, raw, patterns):
                named.setdefault(f, _shard_name(cfg, f, posixpath.relpath(f, root)))
            continue
        p = Path(os.path.expanduser(raw))
        p = p if p.is_absolute() else base / p
        if any(ch in raw for ch in "*?["):
            matched = [m for m in glob.glob(str(p), recursive=True) if os.path.isfile(m)]
            if not matched:
                raise CorpusError(f"corpus {cfg.name!r}: pattern {raw!r} matches no file")
            # names relative to the pattern's fixed leading folders
            fixed = Path(*[part for part in p.parts if not any(c in part for c in "*?[")][:1])
            for part in p.parts[1:]:
                if any(c in part for c in "*?["):
                    break
                fixed = fixed / part
            root = str(fixed if fixed.is_dir() else fixed.parent)
            found = [(os.path.abspath(m), root) for m in matched]
        elif p.is_dir():
            found = [
                (os.path.abspath(m), str(p))
                for pat in patterns
                for m in glob.glob(str(p / "**" / pat), recursive=True)
                if os.path.isfile(m)
            ]
            if not found:
                raise CorpusError(
                    f"corpus {cfg.name!r}: folder {p} holds no file matching {patterns}; "
                    "set `glob` for other file names"
                )
        elif p.is_file():
            found = [(os.path.abspath(p), str(p.parent))]
        else:
            raise CorpusError(f"corpus {cfg.name!r}: path {p} does not exist")
        for f, root in found:
            name = os.path.relpath(f, os.path.abspath(root)).replace(os.sep, "/")
            named.setdefault(f, _shard_name(cfg, f, name))
    by_name: dict[str, str] = {}
    for f, name in named.items():
        if name in by_name and by_name[name] != f:
            raise CorpusError(
                f"corpus {cfg.name!r}: files {by_name[name]} and {f} would share the shard name "
                f"{name!r}; list their common parent folder in paths instead"
            )
        by_name[name] = f
    for f in named:
        if not storage.is_uri(f) and not os.access(f, os.R_OK):
            raise CorpusError(f"corpus {cfg.name!r}: file {f} is not readable")
    return [Shard(cfg.name, f, name) for name, f in sorted(by_name.items())]


def _shard_name(cfg: CorpusConfig, file: str, name: str) -> str:
    if cfg.format == "stackexchange" and "/" not in name:
        # Every dump is called Posts.xml: the site folder is what tells them apart.
        return f"{Path(file).parent.name}/{name}"
    return name


def _uri_files(cfg: CorpusConfig, raw: str, patterns: list[str]) -> list[tuple[str, str]]:
    """``(file, root its shard name is relative to)`` of an object-store path: a glob pattern
    (over the objects under its fixed leading part), an object, or a prefix searched with the
    format's patterns (as a local folder is)."""
    where = storage.redact(raw)
    if any(ch in raw for ch in "*?["):
        parts = raw.split("/")
        fixed = "/".join(parts[:next(i for i, x in enumerate(parts) if any(c in x for c in "*?["))])
        found = [(f, fixed) for f in storage.list_files(fixed, recursive=True)
                 if fnmatch.fnmatchcase(f, raw)]
        if not found:
            raise CorpusError(f"corpus {cfg.name!r}: pattern {where!r} matches no object")
        return found
    if storage.is_file(raw):
        return [(raw.rstrip("/"), storage.parent(raw))]
    root = raw.rstrip("/")
    found = [(f, root) for f in storage.list_files(root, recursive=True)
             if any(fnmatch.fnmatchcase(posixpath.relpath(f, root), pat)
                    or fnmatch.fnmatchcase(posixpath.relpath(f, root), f"*/{pat}")
                    for pat in patterns)]
    if not found:
        raise CorpusError(
            f"corpus {cfg.name!r}: {where} holds no object matching {patterns} (or does not "
            "exist); set `glob` for other file names")
    return found


# --- records ------------------------------------------------------------------------------


def record(shard: Shard, row: int, text: str | None, metadata: dict[str, Any], reason: str | None,
            detail: str = "", raw: str | None = None) -> dict[str, Any]:
    return {
        "doc_id": make_doc_id(shard.corpus, shard.shard, row),
        "corpus": shard.corpus,
        "shard": shard.shard,
        "row": row,
        "text": text if reason is None else None,
        "text_len": len(text) if text is not None else 0,
        "metadata": json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=str),
        "reject_reason": reason,
        "reject_detail": detail,
        "raw": raw if reason is not None else None,
    }


def bounded(shard: Shard, row: int, text: str, metadata: dict[str, Any], cfg: CorpusConfig,
             raw: str | None = None) -> dict[str, Any]:
    """A document record, or a reject when its text is empty or out of the length bounds."""
    stripped = text.strip()
    if not stripped:
        return record(shard, row, None, metadata, "empty_text", "text is empty", raw or text)
    n = len(stripped)
    if n < cfg.min_chars:
        return record(shard, row, None, metadata, "too_short",
                       f"{n} chars < min_chars={cfg.min_chars}", raw or stripped)
    if n > cfg.max_chars:
        return record(shard, row, None, metadata, "too_long",
                       f"{n} chars > max_chars={cfg.max_chars}", raw or stripped)
    return record(shard, row, stripped, metadata, None)


def open_binary(path: str) -> IO[bytes]:
    """A shard's bytes (gunzipped for ``.gz``), streamed from an object store for a URI."""
    try:
        if storage.is_uri(path):
            fs, where = storage.filesystem(path)
            fh = fs.open_input_file(where)
            if path.endswith(".gz"):
                return gzip.open(fh, "rb")  # type: ignore[return-value]
            # pyarrow's file has no readline: buffered, it iterates by lines like open()'s
            return io.BufferedReader(fh, 1 << 20)  # type: ignore[arg-type]
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        return open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise CorpusError(f"cannot open {path}: {exc}") from exc


def _iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open_binary(path) as fh:
        try:
            yield from enumerate(fh)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise CorpusError(f"cannot read {path}: {exc} (truncated or corrupt file?)") from exc


def read_jsonl_shard(shard: Shard, cfg: CorpusConfig) -> Iterator[dict[str, Any]]:
    """C4-style and generic jsonl (optionally gzipped): one JSON object per line."""
    meta_keys = cfg.kept_metadata()
    for row, line in _iter_lines(shard.path):
        if not line.strip():
            continue  # blank lines are not records (trailing newline at EOF)
        line = line.rstrip(b"\r\n")
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield record(shard, row, None, {}, "invalid_utf8", str(exc),
                          line.decode("utf-8", errors="replace"))
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as exc:
            yield record(shard, row, None, {}, "malformed_json", str(exc), s)
            continue
        if not isinstance(obj, dict):
            yield record(shard, row, None, {}, "malformed_json", "line is not a JSON object", s)
            continue
        text = obj.get(cfg.text_field)
        meta = {k: obj[k] for k in meta_keys if k in obj}
        if text is None:
            yield record(shard, row, None, meta, "missing_text",
                          f"no field {cfg.text_field!r} (fields: {sorted(obj)[:10]})", s)
            continue
        if not isinstance(text, str):
            yield record(shard, row, None, meta, "missing_text",
                          f"field {cfg.text_field!r} is {type(text).__name__}, not a string", s)
            continue
        if cfg.title_field and isinstance(obj.get(cfg.title_field), str) and obj[cfg.title_field]:
            meta["title"] = obj[cfg.title_field]
            text = f"{obj[cfg.title_field].strip()}\n\n{text}"
        yield bounded(shard, row, text, meta, cfg, raw=s)


def read_text_shard(shard: Shard, cfg: CorpusConfig) -> Iterator[dict[str, Any]]:
    """Plain text: the whole file is one document, or each non-empty line with text_per_line."""
    if cfg.text_per_line:
        for row, line in _iter_lines(shard.path):
            if not line.strip():
                continue
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield record(shard, row, None, {}, "invalid_utf8", str(exc),
                              line.decode("utf-8", errors="replace"))
                continue
            yield bounded(shard, row, s, {}, cfg)
        return
    with open_binary(shard.path) as fh:
        # A whole-file document longer than max_chars is rejected, so never read much more.
        data = fh.read(cfg.max_chars * 4 + 8)
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield record(shard, 0, None, {}, "invalid_utf8", str(exc),
                      data.decode("utf-8", errors="replace"))
        return
    yield bounded(shard, 0, s, {}, cfg)


def read_parquet_shard(shard: Shard, cfg: CorpusConfig) -> Iterator[dict[str, Any]]:
    """Parquet: text (and optional title/metadata) columns, read one row group at a time."""
    import pyarrow.parquet as pq

    try:
        if storage.is_uri(shard.path):
            fs, where = storage.filesystem(shard.path)
            pf = pq.ParquetFile(fs.open_input_file(where))
        else:
            pf = pq.ParquetFile(shard.path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError
        raise CorpusError(f"cannot read Parquet file {shard.path}: {exc}") from exc
    names = set(pf.schema_arrow.names)
    if cfg.text_field not in names:
        raise CorpusError(
            f"corpus {cfg.name!r}: Parquet file {shard.path} has no column {cfg.text_field!r} "
            f"(columns: {sorted(names)}); set text_field"
        )
    meta_keys = [k for k in cfg.kept_metadata() if k in names]
    cols = [cfg.text_field, *meta_keys]
    if cfg.title_field and cfg.title_field in names:
        cols.append(cfg.title_field)
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=list(dict.fromkeys(cols))):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            text = data[cfg.text_field][i]
            meta = {k: data[k][i] for k in meta_keys}
            if text is None or not isinstance(text, str):
                yield record(shard, row, None, meta, "missing_text",
                              f"column {cfg.text_field!r} is null or not a string", None)
            else:
                title = data.get(cfg.title_field, [None] * batch.num_rows)[i] if cfg.title_field \
                    else None
                if title:
                    meta["title"] = title
                    text = f"{title.strip()}\n\n{text}"
                yield bounded(shard, row, text, meta, cfg)
            row += 1



READERS = {
    "c4": read_jsonl_shard,
    "jsonl": read_jsonl_shard,
    "text": read_text_shard,
    "parquet": read_parquet_shard,
}


def read_shard(shard: Shard, cfg: CorpusConfig) -> Iterator[dict[str, Any]]:
    """All records of one shard (documents and rejects) in a deterministic order."""
    if cfg.format == "stackexchange":  # its module builds on this one's records
        from craft_ray.store.stackexchange import read_stackexchange_shard

        return read_stackexchange_shard(shard, cfg)
    return READERS[cfg.format](shard, cfg)
