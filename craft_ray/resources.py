"""CPUs of model actors: defaults that use the machine, torch threads to match.

A CPU actor that runs a model (hf generation, evaluation, the judge, embedding, a train worker)
asks Ray for ``num_cpus`` and sets ``torch.set_num_threads``. Left unset (``num_cpus: null``),
an actor asks Ray for an equal share of the cluster's CPUs *minus a reserve of one CPU*: Ray
Data's own read tasks (``ListFiles``, ``ReadFiles``: 1 CPU each) and the stage's parse/write
tasks must still be schedulable, or the stage waits forever while its pool holds every CPU
(seen: a 1.5-CPU generator beside a 1-CPU ``ListFiles`` on a 2-CPU node). Its torch threads
then cover its share of *all* cores (those tasks are short, the model runs for minutes): on a
2-CPU node one actor asks for 1 CPU and runs 2 threads. A GPU actor asks for 1 CPU.
"""

from __future__ import annotations

import math

# CPUs left to a stage's Ray Data tasks beside its actor pool (a read task asks 1 CPU).
RESERVED_CPUS = 1.0


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


def actor_resources(requested: float | None, concurrency: int = 1, num_gpus: float = 0.0,
                    threads: int | None = None, total: float | None = None
                    ) -> tuple[float, int]:
    """(CPUs asked of Ray, torch threads) of one actor of a pool of ``concurrency``.

    Explicit settings win; by default the CPUs leave the reserve free while the threads use the
    actor's share of every core (see the module docstring).
    """
    cpus = actor_cpus(requested, concurrency, num_gpus, total)
    if threads is None and requested is None and not num_gpus:
        total = cluster_cpus() if total is None else total
        threads = max(1, math.floor(total / max(1, concurrency)))
    return cpus, torch_threads(cpus, threads)
