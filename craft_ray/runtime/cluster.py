"""Connecting to Ray: a local instance or a cluster address, checked reachable first."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from craft_ray.config import RayConfig

logger = logging.getLogger(__name__)


class ClusterUnreachableError(RuntimeError):
    """The Ray address given cannot be reached."""


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
        # "local": a new Ray of our own even when `ray start` left a cluster on this machine
        # (a bare ray.init() would join that one, and refuse num_cpus)
        ray.init(address=address or "local", **kwargs)
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
