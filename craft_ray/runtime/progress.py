"""Live counters behind the console's progress line: workers add, the driver reads.

Ray Data's own progress knows rows of its datasets, not what a person waits for: tokens
generated per second, generations done out of the prompts planned, training steps, rejects so
far. Stages and their actors add such counts with :func:`report_progress`; the console reads
them with :func:`read_progress` when it writes its line (every ~20 s).

The counts live in one small named actor (0 CPUs) of the current Ray namespace, created by the
driver when a stage begins (:func:`start_progress`) and gone with the driver. Reporting is
fire-and-forget and never fails a stage: without Ray, without the actor, or when the call
fails, the count is dropped (the stage's stats.json stays the record; these are only for the
eye).

Keys a stage may add (all optional):

- ``done``: items finished (generations, documents, steps); ``total``: items planned;
  ``unit``: what an item is ("generations", "docs", "steps");
- ``tokens``: tokens produced (generation) or processed (training);
- ``rejects``: rows rejected so far; ``errors``: backend errors so far.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

ACTOR_NAME = "craft_ray_progress"
# This process's handle to the actor: None = not looked up yet, False = there is none (a
# library call without the CLI): workers look it up once, not per batch.
_handle: Any = None
# The handle that created the actor, kept for the life of the process: Ray ends an actor (not
# detached) once the handle that created it is gone, and a new stage must not lose it.
_owner: Any = None


class ProgressCounters:
    """The counts of the running stage (a Ray actor; plain class for tests)."""

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {}

    def reset(self) -> None:
        """A new stage begins: forget the last one's counts."""
        self.counts = {}

    def add(self, counts: dict[str, Any]) -> None:
        """Add numbers; strings (``unit``) and ``total`` replace the old value."""
        for key, value in counts.items():
            if isinstance(value, str) or key == "total":
                self.counts[key] = value
            else:
                self.counts[key] = self.counts.get(key, 0) + value

    def snapshot(self) -> dict[str, Any]:
        """The counts so far."""
        return dict(self.counts)


def start_progress() -> None:
    """Create (or reset) the counters actor for a new stage; a no-op without Ray."""
    global _handle, _owner
    try:
        import ray

        if not ray.is_initialized():
            return
        for _attempt in range(2):
            if _owner is None:
                actor = ray.remote(num_cpus=0)(ProgressCounters)
                _owner = actor.options(name=ACTOR_NAME, get_if_exists=True).remote()
            try:
                ray.get(_owner.reset.remote(), timeout=30)
                break
            except Exception:  # a handle from an earlier ray.init (tests): start anew
                _owner = None
        _handle = _owner
    except Exception as exc:  # progress is for the eye only; never fail a stage
        logger.debug("progress counters unavailable: %s", exc)
        _handle = None


def _actor() -> Any:
    global _handle
    if _handle is None:
        import ray

        if not ray.is_initialized():
            return None
        try:
            _handle = ray.get_actor(ACTOR_NAME)
        except ValueError:  # no such actor: nobody is watching
            _handle = False
    return _handle or None


def report_progress(**counts: Any) -> None:
    """Add ``counts`` to the running stage's counters (fire-and-forget, never raises)."""
    try:
        actor = _actor()
        if actor is not None:
            actor.add.remote(counts)
    except Exception as exc:  # no actor (a library call without the CLI), Ray gone, ...
        logger.debug("progress report dropped: %s", exc)


def read_progress(timeout: float = 2.0) -> dict[str, Any]:
    """The running stage's counters; empty when there are none (or they do not answer)."""
    try:
        import ray

        actor = _actor()
        return dict(ray.get(actor.snapshot.remote(), timeout=timeout)) if actor else {}
    except Exception as exc:
        logger.debug("progress counters unreadable: %s", exc)
        return {}
