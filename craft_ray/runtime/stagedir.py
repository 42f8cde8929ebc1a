"""Run directories, stage bookkeeping and Ray start-up.

Layout of a run directory::

    RUN_DIR/
      embed/               one folder per stage
        config.yaml        the resolved config of the stage (written first)
        stats.json         rows in/out, rejects by reason, seconds, rows/s
        _SUCCESS           written last: its existence means the stage's outputs are complete
      retrieve/ ...

Invariant: ``_SUCCESS`` is written only after every output of the stage has been renamed into
place, so a reader that sees it never sees partial outputs. ``_SUCCESS`` holds the hash of the
resolved config, so a rerun with a changed config knows the old outputs are stale.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from craft_ray.config import config_hash, dump_yaml
from craft_ray.runtime.files import atomic_write_json, atomic_write_text

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
    """One stage's folder in a run directory: resolved config, stats, success marker."""

    def __init__(self, run_dir: str | Path, stage: str) -> None:
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.path = self.run_dir / stage

    @property
    def success_path(self) -> Path:
        return self.path / SUCCESS

    def is_complete(self, cfg: BaseModel | None = None) -> bool:
        """True when the success marker exists (and, given ``cfg``, its hash matches)."""
        if not self.success_path.is_file():
            return False
        if cfg is None:
            return True
        try:
            info = json.loads(self.success_path.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return info.get("config_hash") == config_hash(cfg)

    def begin(self, cfg: BaseModel, *, clean: bool = False) -> None:
        """Start (or restart) the stage: drop a stale marker, write the resolved config."""
        if clean and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.success_path.unlink(missing_ok=True)
        atomic_write_text(self.path / "config.yaml", dump_yaml(cfg))

    def finish(self, cfg: BaseModel, stats: StageStats) -> dict[str, Any]:
        """Write ``stats.json``, then the success marker (last)."""
        data = stats.finish()
        atomic_write_json(self.path / "stats.json", data)
        atomic_write_json(
            self.success_path, {"config_hash": config_hash(cfg), "finished": time.time()}
        )
        return data
