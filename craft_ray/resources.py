"""CPUs of model actors: defaults that use the machine, torch threads equal to the actor's CPUs.

A CPU actor that runs a model (hf generation, evaluation, the judge, embedding, a train worker)
asks Ray for ``num_cpus`` and sets ``torch.set_num_threads`` to match. Left unset
(``num_cpus: null``), an actor gets an equal share of the cluster's CPUs *minus a reserve*: the
stage's own read, parse and write tasks (0.25-0.5 CPU each) must still find room, or Ray Data
waits on them forever while the actor pool holds every CPU. On a 2-CPU node one actor gets 1.5
CPUs and 2 torch threads; a GPU actor gets 1 CPU (the GPU does the work).
"""

from __future__ import annotations

import math

# CPUs left to a stage's Ray Data tasks (readers, parse/write tasks) beside its actor pool.
RESERVED_CPUS = 0.5


def cluster_cpus() -> float:
    """CPUs of the running Ray cluster (1.0 when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return 1.0
    return float(ray.cluster_resources().get("CPU", 1.0))


def actor_cpus(requested: float | None, concurrency: int = 1, num_gpus: float = 0.0,
               total: float | None = None) -> float:
    """CPUs per actor: ``requested``, or the actor's share of the cluster minus the reserve.

    ``total`` overrides the cluster's CPU count (tests). Never below 1 CPU.
    """
    if requested is not None:
        return float(requested)
    if num_gpus:
        return 1.0
    total = cluster_cpus() if total is None else total
    return max(1.0, (total - RESERVED_CPUS) / max(1, concurrency))


def torch_threads(num_cpus: float, explicit: int | None = None) -> int:
    """Torch intra-op threads of an actor holding ``num_cpus`` CPUs (rounded up: 1.5 -> 2)."""
    return explicit or max(1, math.ceil(num_cpus - 1e-9))
