"""CPUs of model actors, sized from the nodes of the cluster, checked to fit before work starts.

A stage with an actor pool (embed, retrieve, generate/judge/filter through the hf backend,
evaluate, train workers) asks :func:`actor_resources` for each actor's ``num_cpus`` and torch
threads. Every stage goes through it, so one rule holds everywhere:

* **The pool never takes what the stage's own tasks need.** Ray Data's read tasks
  (``ListFiles``/``ReadFiles``: 1 CPU each, the embed readers ``embed.read_num_cpus``) and the
  parse/write tasks run beside the actors. A pool that holds every CPU leaves them
  backpressured for good: no error, no timeout (seen on a 3-node cluster: head with 0 CPUs, two
  1-CPU workers, ``embed.concurrency=2``: two 1-CPU embedders, reads waiting forever at
  ``2.5/2 CPU``). So after the actors are placed, the cluster must keep ``task_cpus`` free
  in total *and on one node* (a task cannot span nodes).
* **Placement is per node.** An actor fits on one node or nowhere; Ray Data spreads its actors
  (``SPREAD``), so the check places them round the nodes the same way.
* **Left unset** (``num_cpus: null``), an actor asks an equal share of the cluster's CPUs minus
  a reserve (at least 1 CPU), lowered until the pool and the tasks fit the nodes; its torch
  threads cover its share of the cores (at most one node's). A GPU actor asks 1 CPU.
* **Set explicitly**, the request is checked, and one that cannot fit fails before any work
  with what was asked, what the cluster has and the key to change (:class:`ResourceFitError`).
  On a cluster with an autoscaler (a cluster-launcher/KubeRay config in the GCS, or
  ``CRAFT_RAY_AUTOSCALING=1``) the nodes present now are not the limit: the misfit is logged.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

from craft_ray.config import ConfigError

logger = logging.getLogger(__name__)

# CPUs left to a stage's Ray Data tasks beside its actor pool (a read task asks 1 CPU).
RESERVED_CPUS = 1.0
_EPS = 1e-6

Node = tuple[float, float]  # (CPUs, GPUs) of one alive node


class ResourceFitError(ConfigError):
    """An actor pool (plus its stage's tasks) cannot fit the cluster's nodes."""


def cluster_nodes() -> list[Node] | None:
    """(CPUs, GPUs) of every alive node of the connected Ray cluster; None without Ray."""
    import ray

    if not ray.is_initialized():
        return None
    out = []
    for n in ray.nodes():
        if n.get("Alive", n.get("alive", False)):
            res = n.get("Resources", {}) or {}
            out.append((float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))))
    return out


def cluster_cpus() -> float:
    """CPUs of the running Ray cluster (1.0 when Ray is not initialised)."""
    nodes = cluster_nodes()
    return sum(c for c, _ in nodes) if nodes else 1.0


def cluster_autoscales() -> bool:
    """True when the cluster may add nodes on demand: Ray holds an autoscaler config, or
    ``CRAFT_RAY_AUTOSCALING=1`` says so (for autoscalers that do not report one)."""
    import ray

    if os.environ.get("CRAFT_RAY_AUTOSCALING") == "1":
        return True
    if not ray.is_initialized():
        return False
    try:
        import ray._private.state

        return ray._private.state.state.get_cluster_config() is not None
    except Exception:  # an older/newer Ray without it, or no GCS: assume a fixed cluster
        return False


def place_spread(nodes: Sequence[Node], n: int, cpus: float, gpus: float = 0.0
                 ) -> list[float] | None:
    """Free CPUs per node after placing ``n`` actors as Ray's SPREAD would (each on the
    fitting node with the most free CPUs); None when one of them fits nowhere."""
    free = [[c, g] for c, g in nodes]
    for _ in range(n):
        fits = [i for i, (c, g) in enumerate(free) if c >= cpus - _EPS and g >= gpus - _EPS]
        if not fits:
            return None
        i = max(fits, key=lambda j: free[j][0])
        free[i][0] -= cpus
        free[i][1] -= gpus
    return [c for c, _ in free]


def pool_fits(nodes: Sequence[Node], n: int, cpus: float, gpus: float = 0.0,
              task_cpus: float = RESERVED_CPUS) -> bool:
    """``n`` actors of ``cpus``/``gpus`` fit the nodes and leave ``task_cpus`` for the
    stage's tasks, in total and on one node."""
    free = place_spread(nodes, n, cpus, gpus)
    if free is None:
        return False
    if task_cpus <= 0:
        return True
    return max(free, default=0.0) >= task_cpus - _EPS


def _default_cpus(nodes: Sequence[Node], n: int, task_cpus: float) -> float | None:
    """The largest per-actor CPUs (at most the equal share of the cluster minus the reserve,
    in steps of 0.01) with which ``n`` actors and the stage's tasks fit; None if none does."""
    total = sum(c for c, _ in nodes)
    share = (total - max(RESERVED_CPUS, task_cpus)) / n
    # The points where the packing changes: a node's CPUs (minus a task) split m ways.
    cands = {share} | {x for c, _ in nodes for m in range(1, n + 1)
                       for x in (c / m, (c - task_cpus) / m)}
    for c in sorted((x for x in cands if 0 < x <= share + _EPS), reverse=True):
        c = math.floor(c * 100 + _EPS) / 100
        if c > 0 and pool_fits(nodes, n, c, 0.0, task_cpus):
            return c
    return None


def _describe(nodes: Sequence[Node]) -> str:
    cpus = sorted((c for c, _ in nodes), reverse=True)
    gpus = sum(g for _, g in nodes)
    return (f"{sum(cpus):g} CPUs on {len(nodes)} nodes (CPUs per node: "
            f"{', '.join(f'{c:g}' for c in cpus)}; {gpus:g} GPUs)")


def _misfit(msg: str) -> None:
    if cluster_autoscales():
        logger.warning("%s (the cluster autoscales: waiting for Ray to add nodes)", msg)
        return
    raise ResourceFitError(f"{msg}. (On a cluster that adds nodes on demand, set "
                           "CRAFT_RAY_AUTOSCALING=1 to wait for them instead.)")


def torch_threads(num_cpus: float, explicit: int | None = None) -> int:
    """Torch intra-op threads of an actor holding ``num_cpus`` CPUs (rounded up: 1.5 -> 2)."""
    return explicit or max(1, math.ceil(num_cpus - 1e-9))


def actor_resources(requested: float | None, concurrency: int = 1, num_gpus: float = 0.0,
                    threads: int | None = None, total: float | None = None, *,
                    key: str = "the stage", task_cpus: float = RESERVED_CPUS,
                    min_size: int | None = None, nodes: Sequence[Node] | None = None,
                    names: tuple[str, str] = ("concurrency", "num_cpus")
                    ) -> tuple[float, int]:
    """(CPUs asked of Ray, torch threads) of one actor of a pool of ``concurrency``.

    ``key`` is the config section named in errors (``embed`` -> ``embed.concurrency``,
    ``embed.num_cpus``); ``task_cpus`` the largest task the stage runs beside the pool;
    ``min_size`` the actors that must start (an autoscaling pool's minimum; default all).
    ``names``: the pool-size and CPU keys of the section (train: ``num_workers``,
    ``cpus_per_worker``). ``nodes`` (or ``total``: one node of that many CPUs) stand in for
    the cluster in tests.
    Raises :class:`ResourceFitError` before any work when the pool cannot fit.
    """
    n = max(1, concurrency)
    if nodes is None:
        nodes = [(float(total), 0.0)] if total is not None else cluster_nodes()
    if not nodes:  # no Ray to ask: what was asked, or one CPU
        cpus = float(requested) if requested is not None else 1.0
        return cpus, torch_threads(cpus, threads)
    must = max(1, min(min_size or n, n))
    size_key, cpus_key = (f"{key}.{name}" for name in names)
    if requested is None and not num_gpus:
        cpus = _default_cpus(nodes, n, task_cpus)
        if cpus is None:
            _misfit(f"{key}: {n} actors plus {task_cpus:g} CPU for the stage's read/write "
                    f"tasks cannot fit the cluster's {_describe(nodes)}. Lower "
                    f"{size_key}, or add nodes")
            return 1.0, torch_threads(1.0, threads)
        if threads is None:
            per_actor = min(sum(c for c, _ in nodes) / n, max(c for c, _ in nodes))
            threads = max(1, math.floor(per_actor + _EPS))
        return cpus, torch_threads(cpus, threads)
    cpus = float(requested) if requested is not None else 1.0
    if not pool_fits(nodes, must, cpus, num_gpus, task_cpus):
        gpu = f" and {num_gpus:g} GPU" if num_gpus else ""
        _misfit(f"{key}: {must} actors x {cpus:g} CPU{gpu} ({size_key} x {cpus_key}) plus "
                f"{task_cpus:g} CPU left for the stage's read/write tasks do not fit the "
                f"cluster's {_describe(nodes)}; an actor fits on one "
                f"node or nowhere, and a pool holding every CPU starves its own reads and "
                f"waits forever. Lower {size_key} or {cpus_key} (unset, it is sized from "
                "the cluster), or add nodes")
    return cpus, torch_threads(cpus, threads)
