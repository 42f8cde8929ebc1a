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
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from craft_ray.config import RayConfig, config_hash, dump_yaml

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"


class ClusterUnreachableError(RuntimeError):
    """The Ray address given cannot be reached."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def tmp_path_for(path: str | Path) -> Path:
    """A sibling temporary path for ``path``; rename it to ``path`` when complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast with :class:`ClusterUnreachableError` when ``host:port`` does not answer.

    ``ray.init`` itself retries an unreachable address for minutes; a TCP connect tells in
    seconds. Addresses without a port (``auto``, ``local``) are left to Ray.
    """
    import socket
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        return
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterUnreachableError(
            f"cannot reach a Ray cluster at {address!r} ({exc}). Check the address (on the "
            "head: `ray status`), open an SSH tunnel / port-forward if it is remote, or drop "
            "--address and RAY_ADDRESS to run on an embedded local Ray."
        ) from None


def init_ray(cfg: RayConfig | None = None) -> None:
    """Connect to the configured cluster, or start an embedded local Ray.

    The same code path serves both: ``address`` (or ``RAY_ADDRESS``) selects a cluster,
    otherwise ``ray.init()`` starts one on this machine. Calling it twice is harmless.
    """
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    from craft_ray import console

    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = console.ray_init_kwargs(cfg.log_to_driver)
    if address is None:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False)
        logger.info("starting an embedded local Ray")
    else:
        check_reachable(address)
        logger.info("connecting to Ray at %s", address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError) as exc:
        raise ClusterUnreachableError(
            f"cannot reach a Ray cluster at {address!r}: {exc}. Check the address (and that "
            "`ray status` works there), or drop --address/RAY_ADDRESS to run on an embedded "
            "local Ray."
        ) from exc
    except Exception as exc:  # ray raises plain Exceptions for bad addresses
        if address is not None and (
            "connect" in str(exc).lower() or "could not find" in str(exc).lower()
        ):
            raise ClusterUnreachableError(
                f"cannot reach a Ray cluster at {address!r}: {exc}. Check the address, or drop "
                "--address/RAY_ADDRESS to run on an embedded local Ray."
            ) from exc
        raise
    console.after_ray_init()


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


@contextmanager
def quiet_ray_data(progress: bool = True) -> Iterator[None]:
    """Ray Data context for stages: progress bars on (or off), verbose plan logging off."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old = ctx.enable_progress_bars
    ctx.enable_progress_bars = progress
    try:
        yield
    finally:
        ctx.enable_progress_bars = old
