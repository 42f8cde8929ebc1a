"""Run directories, stage bookkeeping and Ray start-up.

Layout of a run directory::

    RUN_DIR/
      embed/               one folder per stage
        config.yaml        the resolved config of the stage (written first)
        stats.json         rows in/out, rejects by reason, seconds, rows/s
        _SUCCESS           written last: its existence means the stage's outputs are complete
      retrieve/ ...

``RUN_DIR`` may be an object-store URI (``s3://bucket/run``): every file then is one object,
written once in a single PUT (see :mod:`craft_ray.runtime.storage`).

Invariant: ``_SUCCESS`` is written only after every output of the stage is in place (renamed
locally, PUT on an object store), so a reader that sees it never sees partial outputs.
``_SUCCESS`` holds the hash of the resolved config, so a rerun with a changed config knows the
old outputs are stale.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from craft_ray.config import config_hash, dump_yaml
from craft_ray.runtime import storage

SUCCESS = "_SUCCESS"


@dataclass
class StageStats:
    """Counters every stage reports in ``stats.json``."""

    stage: str
    rows_in: int = 0
    rows_out: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    def finish(self) -> dict[str, Any]:
        """Freeze the timing and return the JSON-ready dict."""
        self.seconds = time.time() - self.started
        return self.as_dict()

    def as_dict(self) -> dict[str, Any]:
        secs = self.seconds or (time.time() - self.started)
        return {
            "stage": self.stage,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rejects": dict(sorted(self.rejects.items())),
            "rejects_total": int(sum(self.rejects.values())),
            "seconds": round(secs, 3),
            "rows_per_s": round(self.rows_out / secs, 3) if secs > 0 else None,
            **self.extra,
        }


class StageDir:
    """One stage's folder in a run directory (a local path or an object-store URI): resolved
    config, stats, success marker.

    ``location`` is the folder as a string, for :mod:`craft_ray.runtime.storage`; ``path`` is
    the same folder as a :class:`~pathlib.Path` for stages that write local files only (an
    object-store run directory there is a clear error, never a silent local write).
    """

    def __init__(self, run_dir: str | Path, stage: str) -> None:
        self.run_dir = str(run_dir)
        self.stage = stage
        self.location = storage.join(self.run_dir, stage)

    @property
    def path(self) -> Path:
        if storage.is_uri(self.location):
            raise storage.StorageError(
                f"the {self.stage} stage cannot write to object storage yet "
                f"({storage.redact(self.location)}); give it a local or shared-filesystem "
                "run_dir")
        return Path(self.location)

    def file(self, name: str) -> str:
        """The location of ``name`` in the stage's folder."""
        return storage.join(self.location, name)

    @property
    def success_path(self) -> str:
        return self.file(SUCCESS)

    def exists(self) -> bool:
        """True when the stage's folder holds anything."""
        return storage.exists(self.location)

    def is_complete(self, cfg: BaseModel | None = None) -> bool:
        """True when the success marker exists (and, given ``cfg``, its hash matches)."""
        if not storage.is_file(self.success_path):
            return False
        if cfg is None:
            return True
        try:
            info = storage.read_json(self.success_path)
        except (OSError, json.JSONDecodeError):
            return False
        return info.get("config_hash") == config_hash(cfg)

    def has_marker(self) -> bool:
        """True when a success marker exists, whatever config it was written for."""
        return storage.is_file(self.success_path)

    def read_stats(self) -> dict[str, Any]:
        """The stage's ``stats.json``."""
        return dict(storage.read_json(self.file("stats.json")))

    def begin(self, cfg: BaseModel, *, clean: bool = False) -> None:
        """Start (or restart) the stage: drop a stale marker, write the resolved config."""
        if clean:
            storage.remove(self.location)
        storage.makedirs(self.location)
        storage.remove(self.success_path)
        storage.write_text(self.file("config.yaml"), dump_yaml(cfg))

    def finish(self, cfg: BaseModel, stats: StageStats) -> dict[str, Any]:
        """Write ``stats.json``, then the success marker (last)."""
        data = stats.finish()
        storage.write_json(self.file("stats.json"), data)
        storage.write_json(
            self.success_path, {"config_hash": config_hash(cfg), "finished": time.time()}
        )
        return data
