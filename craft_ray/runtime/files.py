"""Retry-safe file writes: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def tmp_path_for(path: str | Path) -> Path:
    """A sibling temporary path for ``path``; rename it to ``path`` when complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The one write-then-rename helper: yields a sibling temporary path to write ``path``
    through; renamed onto ``path`` when the block ends, removed if the block or the rename
    raises.

    ``with atomic_path(out) as tmp: pq.write_table(table, tmp)`` never leaves a half-written
    ``out``: readers see the old file or the new one. A folder works the same way (write the
    folder ``tmp``), but a rename never replaces a non-empty folder: remove the old one at the
    end of the block, or catch the ``OSError`` where another process may have written it.
    """
    tmp = tmp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
